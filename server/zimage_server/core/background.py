"""Threads for bulk CPU work (image compression, base64) that yield to the serving threads.

Encoding a batch of large images can keep every core busy for tens of milliseconds: the
deflate slices of each PNG run on several threads, and the encoder threads work on several
images at once. At the same priority that work competes for the CPU with the GPU worker
thread (whose kernel launches keep the GPU fed), the event loop and the separate health
process whose probes decide liveness. On Linux the nice value is a per-thread attribute, so
these threads lower their own priority when they start: whenever the CPU is short, the
latency-critical threads run first and the encoding takes what is left. Raising one's own
nice value needs no privilege; where it is refused or not per-thread (other systems), the
threads run as usual.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

# Added to the nice value of the bulk-work threads (the highest nice value is 19).
NICENESS = 10


def lower_priority() -> None:
    """Set the calling thread's nice value ``NICENESS`` above the main thread's (Linux only).

    Relative to the main thread, not to the calling thread: a thread inherits the nice value
    of the thread that starts it, and pool threads are started by whichever thread submits
    work first (a PNG slice thread by an encoder thread, already lowered)."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError):
        main = os.getpriority(os.PRIO_PROCESS, os.getpid())  # the main thread's id is the pid
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, main + NICENESS))


def pool(workers: int, name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run at the lowered priority."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, initializer=lower_priority)
