"""Queueing behaviour a client relies on: batching, back-pressure, timeouts, disconnects."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from .conftest import SLOW, RunningServer, ServerFactory

pytestmark = pytest.mark.slow

# About a second of the tiny model's work on a CPU, so 5% of it is ample for a client to come back.
LINGER_WORK = {"size": "768x768", "num_inference_steps": 50}
LINGER_WORK_SECONDS = 1.0


def _post(server: RunningServer, body: dict[str, object], timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=timeout)


def test_concurrent_compatible_requests_share_one_forward_pass(serve: ServerFactory) -> None:
    server = serve(max_batch_size=4, batch_wait_ms=1500)
    body = {"prompt": "a tree", "size": "256x256", "num_inference_steps": 2}
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: _post(server, {**body, "seed": i}), range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    metrics = server.metrics()
    # The warm-up ran outside the engine, so these are the four requests alone.
    assert metrics["zimage_batch_size_count"] == 1
    assert metrics["zimage_batch_size_sum"] == 4
    assert metrics["zimage_images_generated_total"] == 4
    images = {r.json()["data"][0]["b64_json"] for r in responses}
    assert len(images) == 4, "each request got its own image back"


def test_clients_that_come_straight_back_share_batches(serve: ServerFactory) -> None:
    """Two clients, each sending its next request as soon as it has its image, the second
    starting while the first one's image is generated. Without the linger after a batch they
    alternate in batches of one; with it, a client just answered joins the other's request."""
    body = {"prompt": "a fox", **LINGER_WORK}

    def batches(linger_ms: float) -> int:
        server = serve(max_batch_size=2, batch_wait_ms=0, batch_linger_ms=linger_ms)

        def client(delay: float) -> list[int]:
            time.sleep(delay)
            return [_post(server, body).status_code for _ in range(3)]

        with ThreadPoolExecutor(2) as pool:
            statuses = list(pool.map(client, [0.0, LINGER_WORK_SECONDS / 3]))
        assert statuses == [[200] * 3] * 2
        metrics = server.metrics()
        assert metrics["zimage_images_generated_total"] == 6
        return int(metrics["zimage_batch_size_count"])

    assert batches(0) == 6
    # {1a} {2a 1b} {2b 1c} {2c}: the linger waits at most 5% of a batch's run time.
    assert batches(10_000) == 4


def test_a_batch_never_mixes_sizes_or_exceeds_the_limit(serve: ServerFactory) -> None:
    server = serve(max_batch_size=2, batch_wait_ms=1000)
    bodies = [
        {"prompt": "a", "size": "256x256", "num_inference_steps": 2, "n": 2},
        {"prompt": "b", "size": "256x256", "num_inference_steps": 2},
        {"prompt": "c", "size": "128x128", "num_inference_steps": 2},
    ]
    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(lambda b: _post(server, b), bodies))
    assert [r.status_code for r in responses] == [200] * 3
    assert [len(r.json()["data"]) for r in responses] == [2, 1, 1]
    metrics = server.metrics()
    assert metrics["zimage_images_generated_total"] == 4
    assert metrics['zimage_batch_size_bucket{le="2.0"}'] == metrics["zimage_batch_size_count"]
    assert metrics["zimage_batch_size_count"] >= 3  # 256 (2) + 256 (1) + 128 (1) cannot fit in two


def test_a_full_queue_answers_429_with_retry_after(serve: ServerFactory) -> None:
    server = serve(max_batch_size=1, max_queue=1, batch_wait_ms=0)
    with ThreadPoolExecutor(2) as pool:
        running: Future[httpx.Response] = pool.submit(_post, server, {"prompt": "a", **SLOW})
        server.wait_metric("zimage_in_flight_requests", lambda v: v == 1)
        queued: Future[httpx.Response] = pool.submit(_post, server, {"prompt": "b", **SLOW})
        server.wait_metric("zimage_queue_depth", lambda v: v == 1)
        rejected = _post(server, {"prompt": "c", "size": "256x256"})
        refused_at = time.monotonic()
        assert rejected.status_code == 429
        retry_after = int(rejected.headers["retry-after"])
        error = rejected.json()["error"]
        assert error["code"] == "queue_full"
        assert "queue is full" in error["message"]
        server.wait_metric("zimage_queue_depth", lambda v: v == 0, timeout=120)
        freed = time.monotonic() - refused_at
        # Priced from the batch on the GPU, never from the warm-up: about when the place in the
        # queue frees.
        assert 1 <= retry_after <= 2 * freed + 2, (retry_after, freed)
        assert running.result().status_code == 200
        assert queued.result().status_code == 200
    assert server.metrics()['zimage_requests_cancelled_total{reason="queue_full"}'] == 1


def test_waiting_past_the_timeout_is_504_and_costs_no_gpu_time(serve: ServerFactory) -> None:
    server = serve(max_batch_size=1, batch_wait_ms=0, request_timeout_s=1.0)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(_post, server, {"prompt": "a", **SLOW})
        server.wait_metric("zimage_in_flight_requests", lambda v: v == 1)
        waiting = pool.submit(_post, server, {"prompt": "b", **SLOW})
        for response in (running.result(), waiting.result()):
            assert response.status_code == 504
            error = response.json()["error"]
            assert error["code"] == "timeout"
            assert "did not finish within 1s" in error["message"]
    server.wait_idle()
    metrics = server.metrics()
    assert metrics['zimage_requests_cancelled_total{reason="timeout"}'] == 1
    assert metrics["zimage_images_generated_total"] == 1, "the request that timed out in the queue never ran"


def test_a_client_that_leaves_before_its_turn_costs_no_gpu_time(serve: ServerFactory) -> None:
    server = serve(max_batch_size=1, batch_wait_ms=0)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_post, server, {"prompt": "a", **SLOW})
        server.wait_metric("zimage_in_flight_requests", lambda v: v == 1)
        body = json.dumps({"prompt": "b", **SLOW}).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as conn:
            conn.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            server.wait_metric("zimage_queue_depth", lambda v: v == 1)
        server.wait_metric('zimage_requests_cancelled_total{reason="disconnect"}', lambda v: v == 1)
        assert server.metrics()["zimage_queue_depth"] == 0
        assert running.result().status_code == 200
    server.wait_idle()
    assert server.metrics()["zimage_images_generated_total"] == 1


def test_requests_before_the_model_is_ready_get_503(serve: ServerFactory) -> None:
    # A long warm-up keeps the server in its warming phase while we probe it.
    server = serve(wait_ready=False, warmup_sizes=["1024x1024"], warmup_steps=40)
    server.wait_metric("zimage_model_ready", lambda v: v == 0)
    assert httpx.get(f"{server.url}/healthz/live").status_code == 200
    assert httpx.get(f"{server.url}/healthz/startup").status_code == 503
    ready = httpx.get(f"{server.url}/healthz/ready")
    assert ready.status_code == 503
    assert ready.json()["phase"] in ("loading", "warming")
    early = _post(server, {"prompt": "too soon", "size": "256x256"})
    assert early.status_code == 503
    assert early.json()["error"]["code"] == "model_not_ready"
    assert server.settings.model not in early.text, "a client never sees a server path"
    assert "retry-after" in early.headers
    server.wait_ready()
    assert httpx.get(f"{server.url}/healthz/startup").status_code == 200
    assert _post(server, {"prompt": "now", "size": "256x256"}).status_code == 200


def test_a_model_that_cannot_load_fails_liveness_with_the_reason(
    serve: ServerFactory, tmp_path: Path
) -> None:
    server = serve(wait_ready=False, model=str(tmp_path / "missing"))
    server.wait_metric("zimage_model_ready", lambda v: v == 0)
    for _ in range(200):
        live = httpx.get(f"{server.url}/healthz/live")
        if live.status_code == 503:
            break
        time.sleep(0.05)
    assert live.status_code == 503
    assert live.json()["phase"] == "failed"
    assert "could not be loaded" in live.json()["detail"]
    assert str(tmp_path) not in live.text, "the reason is in the log and the termination message"
    assert httpx.get(f"{server.url}/healthz/ready").status_code == 503
    refused = _post(server, {"prompt": "anyway", "size": "256x256"})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_failed"
    assert str(tmp_path) not in refused.text, "a client never sees a server path"
