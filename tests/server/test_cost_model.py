"""The load signal an autoscaler reads: queue, in-flight work and pending GPU-seconds."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from zimage_server.engine.cost_model import PRIOR_SECONDS_PER_MEGAPIXEL_STEP, CostModel

from .conftest import SLOW, ServerFactory


def test_the_first_measurement_replaces_the_prior_then_averages() -> None:
    model = CostModel(prior=1.0, weight=0.5)
    assert model.cost(1000, 1000, 8, 1) == pytest.approx(8.0)
    model.observe(1000, 1000, 10, 2, seconds=2.0)  # 0.1 s per megapixel-step-image
    assert model.rate == pytest.approx(0.1)
    model.observe(500, 500, 4, 1, seconds=0.3)  # 0.3 s per unit
    assert model.rate == pytest.approx(0.2)
    assert model.cost(1024, 1024, 8, 4) == pytest.approx(0.2 * 1.048576 * 8 * 4)


def test_nothing_to_measure_changes_nothing() -> None:
    model = CostModel(prior=0.5)
    model.observe(0, 0, 8, 1, seconds=1.0)
    model.observe(512, 512, 8, 1, seconds=0.0)
    assert (model.rate, model.measured) == (0.5, 0)


@pytest.mark.slow
def test_load_reports_queued_and_running_work(serve: ServerFactory) -> None:
    server = serve(max_batch_size=1, batch_wait_ms=0)
    idle = httpx.get(f"{server.url}/load").json()
    assert idle["ready"] is True
    assert (idle["queue_depth"], idle["in_flight"], idle["pending_gpu_seconds"]) == (0, 0, 0)
    assert idle["seconds_per_megapixel_step"] == PRIOR_SECONDS_PER_MEGAPIXEL_STEP, "warm-ups price nothing"
    assert idle["compile_artifacts"] == {"state": "off", "artifact": None}, "no compile_artifacts_dir"

    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, f"{server.url}/generate", json={"prompt": "a", **SLOW}, timeout=60)
        server.wait_metric("zimage_in_flight_requests", lambda v: v == 1)
        queued = pool.submit(httpx.post, f"{server.url}/generate", json={"prompt": "b", **SLOW}, timeout=60)
        server.wait_metric("zimage_queue_depth", lambda v: v == 1)
        busy = httpx.get(f"{server.url}/load").json()
        metric = server.metrics()["zimage_pending_gpu_seconds"]
        assert running.result().status_code == 200
        assert queued.result().status_code == 200
    assert (busy["queue_depth"], busy["queue_images"], busy["in_flight"]) == (1, 1, 1)
    one = busy["seconds_per_megapixel_step"] * 1024 * 1024 / 1e6 * SLOW["num_inference_steps"]
    assert busy["pending_gpu_seconds"] == pytest.approx(2 * one, rel=0.05)
    assert metric == pytest.approx(busy["pending_gpu_seconds"], rel=0.05)
    server.wait_idle()
    assert httpx.get(f"{server.url}/load").json()["pending_gpu_seconds"] == 0
