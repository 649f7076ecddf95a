"""The separate health process: the same answers as the serving port, from a process that
never waits for the server's GIL, and liveness that fails when the server's loop stalls."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from zimage_server.core.config import Settings
from zimage_server.core.processes import free_port
from zimage_server.health.health import HealthProcess
from zimage_server.health.health_board import HealthBoard

from .conftest import ServerFactory


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_the_health_port_answers_like_the_serving_port(serve: ServerFactory) -> None:
    health_port = free_port()
    server = serve(health_port=health_port)
    health_url = f"http://127.0.0.1:{health_port}"
    for probe in ("live", "ready", "startup"):
        _wait(lambda probe=probe: httpx.get(f"{health_url}/healthz/{probe}").status_code == 200)
        own = httpx.get(f"{server.url}/healthz/{probe}").json()
        other = httpx.get(f"{health_url}/healthz/{probe}").json()
        assert other["phase"] == own["phase"] == "ready"
        assert other.keys() == own.keys()
    assert "vram" in httpx.get(f"{health_url}/healthz/live").json()
    missing = httpx.get(f"{health_url}/v1/models")
    assert missing.status_code == 404
    assert "/healthz/live" in missing.json()["detail"]


def test_liveness_fails_when_the_heartbeat_stops_and_recovers_when_it_returns() -> None:
    port = free_port()
    process = HealthProcess("127.0.0.1", port, stall_s=0.5)
    process.start()
    url = f"http://127.0.0.1:{port}/healthz/live"
    try:
        assert httpx.get(url).status_code == 503  # nothing published yet
        assert httpx.get(url).json()["detail"] == "the server is starting"
        ok = {"status": "ok", "phase": "ready", "detail": "serving"}
        process.board.publish({"live": (200, ok), "ready": (200, ok), "startup": (200, ok)})
        process.board.beat()
        assert httpx.get(url).status_code == 200
        time.sleep(0.8)  # the serving loop "stalls": no beat
        stalled = httpx.get(url)
        assert stalled.status_code == 503
        assert "event loop has not run for" in stalled.json()["detail"]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz/ready").status_code == 200  # only liveness
        process.board.beat()
        assert httpx.get(url).status_code == 200
    finally:
        process.stop()
    assert not process.board.path.exists()


def test_the_health_process_exits_when_its_parent_dies(tmp_path: Path) -> None:
    port = free_port()
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from zimage_server.health.health import HealthProcess\n"
            f"p = HealthProcess('127.0.0.1', {port}, 30.0)\n"
            "p.start()\n"
            "print(p.proc.pid, flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert httpx.get(f"http://127.0.0.1:{port}/healthz/live").status_code == 503
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    parent.stdout.close()

    def gone() -> bool:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{child}/status").read_text().find("State:\tZ") >= 0

    _wait(gone, timeout=10)
    assert not list(
        Path(tempfile.gettempdir() if not Path("/dev/shm").is_dir() else "/dev/shm").glob(
            f"zimage-health-{parent.pid}-*"
        )
    ), "SIGKILL left the board behind"


def test_boards_of_processes_that_are_gone_are_removed_at_start() -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    live = HealthBoard.create()
    stale = live.path.with_name(f"zimage-health-{int(gone.stdout)}-abcd")
    stale.write_bytes(b"\0" * 64)
    try:
        other = HealthBoard.create()
        other.close(remove=True)
        assert not stale.exists()
        assert live.path.exists(), "a running process's board is kept"
    finally:
        stale.unlink(missing_ok=True)
        live.close(remove=True)


def test_a_health_port_in_use_stops_the_start_with_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        process = HealthProcess("127.0.0.1", port, 30.0)
        with pytest.raises(RuntimeError, match=f"could not listen on 127.0.0.1:{port}"):
            process.start()
    assert not process.board.path.exists()


def test_the_health_port_must_differ_from_the_serving_port() -> None:
    with pytest.raises(ValidationError, match="health_port must differ from port"):
        Settings(_env_file=None, port=8000, health_port=8000)


WRITER = """
import sys, time
from pathlib import Path
from zimage_server.health.health_board import HealthBoard
board = HealthBoard(Path(sys.argv[1]), writable=True)
deadline = time.monotonic() + 2.0
i = 0
while time.monotonic() < deadline:
    body = {"n": i, "detail": "x" * (i % 997)}
    board.publish({"live": (200, body), "ready": (503, body), "startup": (200, body)})
    i += 1
print(i, flush=True)
"""


def test_a_reader_never_sees_a_half_written_answer() -> None:
    """Another process rewrites the board as fast as it can while this one reads it."""
    board = HealthBoard.create()
    reader = HealthBoard.open(board.path)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(board.path)], stdout=subprocess.PIPE, text=True
    )
    reads = 0
    try:
        while writer.poll() is None:
            responses, _ = reader.read()
            if not responses:
                continue
            body = responses["live"][1]
            assert len(body["detail"]) == body["n"] % 997
            assert responses["ready"] == (503, body)
            reads += 1
        assert writer.stdout is not None
        writes = int(writer.stdout.read())
    finally:
        writer.wait()
        reader.close()
        board.close(remove=True)
    assert writes > 1000
    assert reads > 1000
