"""Child processes: stopping one (SIGTERM, a grace period, then SIGKILL), and a free loopback
port to start one on. The health process, the tests and the benchmarks all use these."""

from __future__ import annotations

import socket
import subprocess
from typing import Any


def stop_process(proc: subprocess.Popen[Any], grace: float = 30.0) -> int:
    """Ask ``proc`` to stop, kill it if it is still running after ``grace`` seconds; its exit code."""
    if proc.poll() is None:
        proc.terminate()
    return _reap(proc, grace)


def stop_processes(procs: list[subprocess.Popen[Any]], grace: float = 30.0) -> None:
    """``stop_process`` for several at once: all are asked first, so their grace periods overlap.
    Each is asked once: a second SIGTERM tells the server to stop without draining."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        _reap(proc, grace)


def _reap(proc: subprocess.Popen[Any], grace: float) -> int:
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return int(proc.returncode)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` just now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
