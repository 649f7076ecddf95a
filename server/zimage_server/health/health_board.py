"""The probe answers, shared with the health process through a small memory-mapped file.

The serving process computes the three probe responses (status and JSON body) and writes
them here a few times a second, with a heartbeat from its event loop. The health process
(``health_server.py``) answers the kubelet from this board alone, so a probe never waits for
the serving process's GIL or event loop, while a stuck event loop still fails liveness
through the heartbeat.

Layout: ``seq`` (u64), ``length`` (u32), heartbeat (f64, CLOCK_MONOTONIC seconds, which is
the same clock in every process), then ``length`` bytes of JSON from offset 64. ``seq`` is a
sequence lock: odd while the writer is changing the payload; a reader retries when it was odd
or changed under it. This module imports only the standard library: the health process
loads nothing else.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

SIZE = 1 << 16
_HEADER = struct.Struct("<QI")  # seq, length
_BEAT = struct.Struct("<d")
_BEAT_AT = 16
_PAYLOAD_AT = 64
PROBES = ("live", "ready", "startup")
PREFIX = "zimage-health-"
_IMPORTED = time.time()  # about when this process started


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_boards(directory: Path) -> None:
    """Remove the boards of processes that no longer run. A board named for this very process
    but older than it is stale too: it is from an earlier life of the same PID (PID 1 in a
    restarted container, whose /dev/shm outlives it)."""
    for path in directory.glob(f"{PREFIX}*-*"):
        pid = path.name.removeprefix(PREFIX).partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            earlier_life = int(pid) == os.getpid() and path.stat().st_mtime < _IMPORTED
        except OSError:
            continue
        if earlier_life or not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _board_dir() -> str | None:
    # /dev/shm is memory on Linux (and an emptyDir of medium Memory in the operator's pods).
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class HealthBoard:
    def __init__(self, path: Path, writable: bool) -> None:
        self.path = path
        self.writable = writable
        with open(path, "r+b" if writable else "rb") as handle:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._map = mmap.mmap(handle.fileno(), SIZE, access=access)
        self._last_payload = b""

    @classmethod
    def create(cls) -> HealthBoard:
        """A new board, named for this process; boards left by processes that are gone (killed
        before they could remove theirs) are removed first."""
        directory = _board_dir()
        remove_stale_boards(Path(directory or tempfile.gettempdir()))
        fd, name = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=directory)
        os.ftruncate(fd, SIZE)
        os.close(fd)
        return cls(Path(name), writable=True)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> HealthBoard:
        return cls(Path(path), writable=False)

    def beat(self) -> None:
        _BEAT.pack_into(self._map, _BEAT_AT, time.monotonic())

    def publish(self, responses: dict[str, tuple[int, dict[str, Any]]]) -> None:
        """``responses``: probe name -> (HTTP status, JSON body). Written only when it changed."""
        payload = json.dumps({name: [status, body] for name, (status, body) in responses.items()}).encode()
        if payload == self._last_payload:
            return
        if len(payload) > SIZE - _PAYLOAD_AT:
            raise ValueError(f"health payload of {len(payload)} bytes does not fit the board")
        seq, _ = _HEADER.unpack_from(self._map, 0)
        _HEADER.pack_into(self._map, 0, seq + 1, 0)
        self._map[_PAYLOAD_AT : _PAYLOAD_AT + len(payload)] = payload
        _HEADER.pack_into(self._map, 0, seq + 2, len(payload))
        self._last_payload = payload

    def read(self) -> tuple[dict[str, tuple[int, Any]], float]:
        """The published responses (empty before the first) and the heartbeat's age in seconds."""
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            seq, length = _HEADER.unpack_from(self._map, 0)
            if seq % 2:  # the writer is mid-update: let it finish
                time.sleep(0)
                continue
            payload = bytes(self._map[_PAYLOAD_AT : _PAYLOAD_AT + length])
            beat = _BEAT.unpack_from(self._map, _BEAT_AT)[0]
            if _HEADER.unpack_from(self._map, 0)[0] == seq:
                responses = (
                    {name: (int(v[0]), v[1]) for name, v in json.loads(payload).items()} if length else {}
                )
                age = time.monotonic() - beat if beat else float("inf")
                return responses, age
        raise RuntimeError("the health board kept changing while being read")

    def close(self, remove: bool = False) -> None:
        self._map.close()
        if remove:
            self.path.unlink(missing_ok=True)
