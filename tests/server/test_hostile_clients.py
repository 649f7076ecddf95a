"""What one client can take from the others and from the probes, over real sockets on loopback.

Attackers connect from other loopback addresses (127.0.0.2, 127.0.0.3), as other pods would from
their own; the kubelet's probes and the well-behaved clients come from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from zimage_server.core.processes import free_port, free_ports
from zimage_server.health import health_server
from zimage_server.http.middleware import LastWordMiddleware

from .conftest import RunningServer, ServerFactory

pytestmark = pytest.mark.slow

GEN = "/v1/images/generations"
IP_BIND_ADDRESS_NO_PORT = 24  # Linux; not in the socket module before Python 3.12
PROBE = b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n"


@contextlib.contextmanager
def held(
    port: int, count: int, source: str, *, receive_buffer: int | None = None
) -> Iterator[list[socket.socket]]:
    """``count`` connections to ``port`` from ``source``, closed on exit; the ones the server
    refused or closed at once are simply among them."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if receive_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            # The port picked at connect: bound first, it may meet a closed one in TIME_WAIT.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def send_what_fits(sock: socket.socket, data: bytes) -> None:
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError, ConnectionError):
        sock.send(data)


def send_until_cut(sock: socket.socket, data: bytes) -> None:
    sock.settimeout(30)
    with contextlib.suppress(OSError):
        sock.sendall(data)


def closed_by_server(sock: socket.socket) -> bool:
    """Reads what the kernel still holds for ``sock``; whether the server's end is closed (a
    held connection leaves the read waiting)."""
    sock.setblocking(True)
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def timed_probe(url: str) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.get(url, timeout=1.0)
    return response.status_code, time.monotonic() - started


# -- the health port --------------------------------------------------------------------------


def test_the_probe_is_answered_while_thousands_of_connections_are_held(serve: ServerFactory) -> None:
    health_port = free_port()
    serve(health_port=health_port)
    probe_url = f"http://127.0.0.1:{health_port}/healthz/live"
    # 300 that pipeline probes and never read their answers, then 3000 that send nothing.
    with held(health_port, 300, "127.0.0.3", receive_buffer=4096) as greedy:
        for sock in greedy:
            send_what_fits(sock, PROBE * 2000)
        with held(health_port, 3000, "127.0.0.2"):
            time.sleep(0.5)
            answers = [timed_probe(probe_url) for _ in range(20)]
    assert [status for status, _ in answers] == [200] * 20
    assert max(seconds for _, seconds in answers) < 1.0, answers


def test_a_probe_client_that_never_reads_is_cut(serve: ServerFactory) -> None:
    health_port = free_port()
    server = serve(health_port=health_port)
    assert server.app.state.health_process.proc is not None
    pid = server.app.state.health_process.proc.pid
    before = open_fds(pid)
    with held(health_port, 5, "127.0.0.3", receive_buffer=4096) as greedy, ThreadPoolExecutor(5) as pool:
        # Answers past what the kernel's buffers hold (about 100,000 on loopback): the server's
        # writes then wait on the client.
        for sock in greedy:
            pool.submit(send_until_cut, sock, PROBE * 200_000)
        time.sleep(1)
        assert open_fds(pid) >= before + 5, "the pipelining clients are connected"
        deadline = time.monotonic() + health_server.SEND_TIMEOUT_S + 10
        while open_fds(pid) > before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert open_fds(pid) <= before, "connections that never read were still held"


# -- the serving port -------------------------------------------------------------------------


def test_one_address_cannot_push_another_to_503(serve: ServerFactory) -> None:
    server = serve()  # max_connections 1000
    with held(server.port, 3000, "127.0.0.2"):
        time.sleep(0.5)
        for _ in range(5):
            models = httpx.get(f"{server.url}/v1/models", timeout=5)
            assert models.status_code == 200, models.text
        made = httpx.post(
            f"{server.url}{GEN}",
            json={"prompt": "a", "size": "256x256", "num_inference_steps": 1},
            timeout=60,
        )
        assert made.status_code == 200
    metrics = server.metrics()
    assert metrics['zimage_connections_cut_total{reason="evicted"}'] >= 2000
    assert metrics['zimage_connections_cut_total{reason="over_capacity"}'] == 0


def test_idle_connections_make_room_and_only_busy_ones_fill_the_cap(serve: ServerFactory) -> None:
    server: RunningServer = serve(max_connections=4, max_batch_size=1, batch_wait_ms=0)
    with held(server.port, 4, "127.0.0.1") as idle:
        time.sleep(0.2)
        # A fifth connection takes the place of the oldest idle one and is served.
        assert httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200
        assert closed_by_server(idle[0]), "the oldest idle connection was closed"
        assert idle[0].recv(1) == b"", "closed as an idle keep-alive connection is, not reset"
    slow = {"prompt": "busy", "size": "512x512", "num_inference_steps": 30}
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(httpx.post, f"{server.url}{GEN}", json=slow, timeout=120) for _ in range(4)]
        engine = server.app.state.service.engine  # read in process: /metrics would need a connection
        deadline = time.monotonic() + 60
        while engine.waiting < 3:
            assert time.monotonic() < deadline, "the requests never queued up"
            time.sleep(0.02)
        refused = httpx.get(f"{server.url}/v1/models", timeout=5)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "too_many_connections"
        assert refused.headers["retry-after"] == "1"
        assert [future.result().status_code for future in busy] == [200] * 4


def test_a_client_that_never_reads_its_images_is_cut_and_its_memory_freed(serve: ServerFactory) -> None:
    server = serve(send_timeout_s=1.0, max_size=1024)
    body = json.dumps({"prompt": "noise", "n": 4, "size": "1024x1024", "num_inference_steps": 1})
    request = (
        f"POST {GEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    # Once the way a reading client does, so that the allocator's pools are as they stay.
    first = httpx.post(
        f"{server.url}{GEN}", content=body, headers={"Content-Type": "application/json"}, timeout=120
    )
    assert first.status_code == 200
    before = rss_mib(os.getpid())
    with held(server.port, 3, "127.0.0.2", receive_buffer=4096) as readers:
        for sock in readers:
            sock.sendall(request)
        cut = server.wait_metric('zimage_connections_cut_total{reason="send_timeout"}', lambda v: v >= 3, 120)
        assert cut == 3
        time.sleep(0.5)
        for sock in readers:
            assert closed_by_server(sock), "the connection was held"
    after = rss_mib(os.getpid())
    assert after < before * 1.1, f"RSS {before:.0f} MiB before, {after:.0f} MiB after the cut"
    assert httpx.get(f"{server.url}/v1/models").status_code == 200


def test_bodies_sent_to_a_route_that_takes_none_cost_no_memory(serve: ServerFactory) -> None:
    server = serve()
    megabyte = b"x" * 1_000_000
    head = b"GET /load HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n"
    before = rss_mib(os.getpid())
    with held(server.port, 400, "127.0.0.2") as senders:
        for sock in senders:
            send_what_fits(sock, head + megabyte)
        time.sleep(2)
        grown = rss_mib(os.getpid()) - before
        answered = 0
        for sock in senders:
            sock.setblocking(True)
            sock.settimeout(5)
            with contextlib.suppress(OSError):
                answered += sock.recv(65536).startswith(b"HTTP/1.1 200")
    assert answered == 400, "every GET /load was answered without its body being read"
    assert grown < 64, f"RSS grew {grown:.0f} MiB for 400 unread bodies"


def test_a_drain_that_runs_out_of_time_answers_only_200_or_json_503(tiny_model_dir: Path) -> None:
    port, health_port = free_ports(2)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "zimage_server", "serve", "--port", str(port),
            "--model", str(tiny_model_dir), "--device", "cpu", "--max-batch-size", "4",
            "--batch-wait-ms", "0", "--warmup-sizes", "256x256", "--min-size", "64",
            "--health-port", str(health_port), "--drain-timeout-s", "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "a queue of foxes", "n": 4, "size": "512x512", "num_inference_steps": 12}
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not start"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz/ready").status_code == 200:
                    break
            time.sleep(0.1)
        with ThreadPoolExecutor(10) as pool:
            accepted = [pool.submit(httpx.post, f"{url}{GEN}", json=body, timeout=120) for _ in range(10)]
            while "zimage_queue_depth 9.0" not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline, "the burst never queued up"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            results = [future.result() for future in accepted]
        proc.wait(timeout=30)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) <= {200, 503}, statuses
    assert 503 in statuses, "the drain's time ran out with work queued"
    for refused in (r for r in results if r.status_code == 503):
        assert refused.headers["content-type"] == "application/json"
        assert refused.json()["error"]["code"] == "draining"
    assert proc.returncode == 0
    assert exited < 15, f"exited {exited:.1f}s after SIGTERM"
    assert proc.stdout is not None
    log = proc.stdout.read()
    for sign in ("never retrieved", "Exception in ASGI application", "Traceback"):
        assert sign not in log, log[-3000:]


def test_a_request_cancelled_at_shutdown_gets_a_json_503() -> None:
    """uvicorn cancels what still runs when its shutdown's grace ends; the client gets the
    OpenAI-shaped 503, not uvicorn's text/plain 500."""
    sent: list[dict[str, Any]] = []

    async def stuck(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(3600)

    async def record(message: Any) -> None:
        sent.append(message)

    async def nothing() -> Any:
        return {"type": "http.disconnect"}

    async def main() -> None:
        app = LastWordMiddleware(stuck)
        task = asyncio.create_task(app({"type": "http"}, nothing, record))
        await asyncio.sleep(0.01)
        task.cancel()
        await task  # ends: the cancellation was answered

    asyncio.run(main())
    start, body = sent
    assert start["status"] == 503
    assert (b"content-type", b"application/json") in start["headers"]
    assert json.loads(body["body"])["error"]["code"] == "draining"


# -- what a client is told ----------------------------------------------------------------------


def test_probes_name_no_server_path(serve: ServerFactory, tiny_model_dir: Path, tmp_path: Path) -> None:
    health_port = free_port()
    server = serve(health_port=health_port)
    for url in (f"{server.url}/healthz/live", f"http://127.0.0.1:{health_port}/healthz/live"):
        live = httpx.get(url)
        assert live.status_code == 200
        assert str(tiny_model_dir) not in live.text
        assert "tiny-model" not in live.text
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    failed = serve(wait_ready=False, model=str(broken))
    live = failed.wait_live(503)
    assert live.json()["phase"] == "failed"
    assert str(tmp_path) not in live.text
    assert "model_index.json" not in live.text, "no exception text either"
    load = httpx.get(f"{server.url}/load").json()
    assert "/" not in json.dumps(load["compile_artifacts"])
