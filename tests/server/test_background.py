"""Encoding yields the CPU: its threads run below the serving threads' priority (Linux)."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from zimage_server.core import background, png

from .conftest import ServerFactory

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_png_slices_and_the_servers_encoder_threads_run_at_a_lower_priority(serve: ServerFactory) -> None:
    serving = _nice()
    lowered = min(19, serving + background.NICENESS)
    server = serve()
    encoder = server.app.state.service.encoder
    assert encoder.submit(_nice).result() == lowered
    # Slice threads started from an encoder thread (as when an image is encoded) are lowered
    # once, not twice: a new thread inherits the nice value of the thread that starts it.
    with background.pool(2, "slices") as slices:
        assert encoder.submit(lambda: slices.submit(_nice).result()).result() == lowered
    assert png._threads().submit(_nice).result() == lowered
    # Only those threads: the caller's own priority is untouched.
    assert _nice() == serving
