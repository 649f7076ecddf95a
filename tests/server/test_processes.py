"""Stopping child processes: one SIGTERM each (a second tells the server to skip its drain),
then SIGKILL for one that outlives its grace period. Free ports for the processes to start on."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys

from zimage_server.core.processes import free_ports, stop_process, stop_processes

# Exits 0 after its first SIGTERM once a moment has passed; 3 if a second SIGTERM comes first.
CHILD = """
import signal, sys, time
seen = []
def on_term(signum, frame):
    seen.append(signum)
    if len(seen) > 1:
        sys.exit(3)
signal.signal(signal.SIGTERM, on_term)
print("up", flush=True)
while not seen:
    time.sleep(0.01)
time.sleep(0.5)
sys.exit(0)
"""
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("up", flush=True)
time.sleep(60)
"""


def _start(code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "up"
    proc.stdout.close()
    return proc


def test_each_process_is_asked_once() -> None:
    procs = [_start(CHILD) for _ in range(2)]
    stop_processes(procs, grace=10)
    assert [proc.returncode for proc in procs] == [0, 0]
    assert stop_process(_start(CHILD), grace=10) == 0


def test_a_process_that_ignores_the_request_is_killed() -> None:
    assert stop_process(_start(STUBBORN), grace=0.5) == -9


def test_ports_picked_together_are_distinct_and_free() -> None:
    # A cluster starts six to ten programs on ports picked at once; two of them on one port
    # fail to start (seen: the controller manager on the API server's port).
    ports = free_ports(64)
    assert len(set(ports)) == 64
    with contextlib.ExitStack() as stack:
        for port in ports:
            stack.enter_context(socket.create_server(("127.0.0.1", port)))
