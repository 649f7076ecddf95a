"""Read the model's weight files into the page cache from the process's start.

A new replica spends its first seconds importing torch, diffusers and the server and making
its CUDA context, all on the CPU, while its weights (about 20 GB for Z-Image-Turbo in bf16) sit
on a disk or a network volume that only the load starts reading. Reading the files on a
background thread meanwhile (a read releases the GIL) overlaps the two: where the volume is
the slow part, the load then copies from memory. Once the load has its weights the reading
stops. On the CPU machine, where the load's own read-ahead kept up, it changed nothing
(docs/performance.md): off by default (``prefetch_weights``).

Only sources that resolve without a download are read: a local directory, and a Hub source
with ``HF_HUB_OFFLINE`` set (the cache a prefetch Job filled). A source that does not resolve
is left to the load, which says why.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from zimage_server.core.sources import ModelSource, hub_offline
from zimage_server.pipeline.model_source import resolve

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")
CHUNK_BYTES = 16 << 20


def weight_files(root: Path) -> list[Path]:
    """The weight files under a pipeline's directory, largest first (the transformer's)."""
    files = [path for path in root.rglob("*") if path.suffix in WEIGHT_SUFFIXES and path.is_file()]
    return sorted(files, key=lambda path: path.stat().st_size, reverse=True)


def local_directory(model: str, revision: str, cache_dir: str | None) -> Path | None:
    """The directory ``model`` resolves to without downloading anything, else ``None``."""
    try:
        source = ModelSource.parse(model, revision)
        # The built-in tiny model is small; an online Hub source is read as it downloads.
        if source.scheme == "builtin" or (source.scheme == "hf" and not hub_offline()):
            return None
        return resolve(source, cache_dir)  # offline: the Hub cache's snapshot, no download
    except Exception as exc:  # not in the cache, not a pipeline: the load says so, in its words
        logger.debug("weight prefetch: %s does not resolve locally: %s", model, exc)
        return None


class WeightPrefetch:
    """Finds the weight files with ``find`` and reads each once, on a daemon thread, until done
    or stopped."""

    def __init__(self, find: Callable[[], list[Path]], chunk_bytes: int = CHUNK_BYTES) -> None:
        self.find = find
        self.chunk_bytes = chunk_bytes
        self.files: list[Path] = []
        self.bytes_read = 0
        self.seconds = 0.0
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weight-prefetch", daemon=True)

    def start(self) -> WeightPrefetch:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop reading (the load has its weights); returns once the thread has."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self.files = self.find()
            buffer = memoryview(bytearray(self.chunk_bytes))
            for path in self.files:
                with path.open("rb", buffering=0) as handle:
                    if hasattr(os, "posix_fadvise"):  # a larger read-ahead window where the OS has one
                        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    while not self._stop.is_set():
                        count = handle.readinto(buffer)
                        if not count:
                            break
                        self.bytes_read += count
                if self._stop.is_set():
                    break
        except OSError as exc:  # a file gone or unreadable: the load will say so
            logger.warning("weight prefetch stopped: %s", exc)
        finally:
            self.seconds = time.perf_counter() - started
            self.finished.set()
        if self.files:
            logger.info(
                "weight prefetch: read %.2f GiB of %d files in %.1fs%s",
                self.bytes_read / 2**30,
                len(self.files),
                self.seconds,
                " (stopped: the load was done first)" if self._stop.is_set() else "",
            )


# The process's prefetch: the page cache it fills is the whole machine's, so one per process.
_current: WeightPrefetch | None = None


def start(model: str, revision: str, cache_dir: str | None) -> WeightPrefetch:
    """Start reading the weight files of ``model``, where it resolves locally (found on the
    thread: a Hub cache's lookup imports huggingface_hub)."""
    global _current

    def find() -> list[Path]:
        directory = local_directory(model, revision, cache_dir)
        return weight_files(directory) if directory is not None else []

    _current = WeightPrefetch(find).start()
    return _current


def finish() -> WeightPrefetch | None:
    """Stop the process's prefetch (a load has its weights) and return it; ``None`` where none
    read anything."""
    global _current
    prefetch, _current = _current, None
    if prefetch is None:
        return None
    prefetch.stop()
    return prefetch if prefetch.files else None
