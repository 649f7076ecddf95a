"""Child processes: stopping one (SIGTERM, a grace period, then SIGKILL), and a free loopback
port to start one on. The health process, the tests and the benchmarks all use these. And
this process's own age, for the start-up's account of itself."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path
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
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` just now. All are held while the others are
    picked: ports picked one after another, each released at once, can repeat."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind((host, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def process_age() -> float | None:
    """Seconds since this process started (Linux: from /proc), or None where that is unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    return max(0.0, uptime - started)
