"""The server is bounded by design: bodies, the time a request may take to arrive, idle
connections and their number, on the serving port and on the health port."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from zimage_server.core.processes import free_port
from zimage_server.health import health_server

from .conftest import ServerFactory

pytestmark = pytest.mark.slow

GEN = "/v1/images/generations"


@contextmanager
def connection(port: int) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        yield sock
    finally:
        sock.close()


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def closed_within(sock: socket.socket, seconds: float) -> float:
    """How long the server took to close ``sock``; fails past ``seconds``."""
    started = time.monotonic()
    sock.settimeout(seconds)
    read_all(sock)
    return time.monotonic() - started


def test_a_body_over_the_limit_is_413_before_it_is_read(serve: ServerFactory) -> None:
    server = serve(max_body_bytes=64 * 1024)
    with connection(server.port) as sock:
        head = f"POST {GEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {300 * 2**20}\r\n\r\n".encode())  # and no body at all
        answer = read_all(sock)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 413"), answer[:200]
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large"
    assert "65536 bytes" in error["message"]


def test_a_chunked_body_over_the_limit_is_413(serve: ServerFactory) -> None:
    server = serve(max_body_bytes=64 * 1024)

    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"x" * 4096

    response = httpx.post(
        f"{server.url}{GEN}", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    ok = httpx.post(f"{server.url}{GEN}", json={"prompt": "a", "size": "256x256", "num_inference_steps": 1})
    assert ok.status_code == 200, "the server serves on after refusing a body"


def test_half_sent_requests_and_silent_connections_are_closed(serve: ServerFactory) -> None:
    server = serve(request_read_timeout_s=1.0)
    with connection(server.port) as silent, connection(server.port) as head, connection(server.port) as body:
        head.sendall(f"POST {GEN} HTTP/1.1\r\nHost: x\r\n".encode())  # the head never ends
        body.sendall(
            f"POST {GEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"prompt": '.encode()
        )
        for sock in (silent, head, body):
            assert closed_within(sock, 5) < 3
    assert httpx.get(f"{server.url}/healthz/ready").status_code == 200


def test_a_slow_request_that_arrives_in_time_is_served(serve: ServerFactory) -> None:
    server = serve(request_read_timeout_s=2.0)
    payload = json.dumps({"prompt": "slowly", "size": "256x256", "num_inference_steps": 1}).encode()
    with connection(server.port) as sock:
        sock.sendall(f"POST {GEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode())
        time.sleep(0.5)
        sock.sendall(f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode())
        time.sleep(0.5)
        sock.sendall(payload)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("Threads:")).split()[1])


def test_the_health_port_holds_idle_connections_without_threads(serve: ServerFactory) -> None:
    health_port = free_port()
    server = serve(health_port=health_port)
    health_process = server.app.state.health_process
    assert health_process.proc is not None
    pid = health_process.proc.pid
    before = _threads(pid)
    with ExitStack() as stack:
        for _ in range(200):
            stack.enter_context(connection(health_port))
        time.sleep(0.5)
        assert _threads(pid) <= before + 1
        assert httpx.get(f"http://127.0.0.1:{health_port}/healthz/live").status_code == 200
    with connection(health_port) as half:
        half.sendall(b"GET /healthz/live HTTP/1.1\r\n")  # the kubelet never does this
        assert closed_within(half, health_server.HEAD_TIMEOUT_S + 5) < health_server.HEAD_TIMEOUT_S + 2


def test_an_idle_kept_alive_connection_is_closed(serve: ServerFactory) -> None:
    health_port = free_port()
    server = serve(keep_alive_timeout_s=1.0, health_port=health_port)
    for port, idle_s in ((server.port, 1.0), (health_port, health_server.IDLE_TIMEOUT_S)):
        with connection(port) as sock:
            sock.sendall(b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            assert closed_within(sock, idle_s + 5) < idle_s + 2
