"""A replica serves as soon as its weights are loaded, uncompiled, while a warm-up beside the
requests builds the compiled pipeline; then the compiled pipeline takes over."""

from __future__ import annotations

import base64
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from zimage_server.core.config import Settings
from zimage_server.engine.cost_model import PRIOR_SECONDS_PER_MEGAPIXEL_STEP, UNCOMPILED_SLOWDOWN, CostModel
from zimage_server.pipeline.block_compile import CompileGate, OneAtATime, compile_module
from zimage_server.pipeline.runner import PipelineRunner

from .conftest import ServerFactory, pixel_difference

REQUEST = {"prompt": "a lighthouse at dusk", "size": "256x256", "num_inference_steps": 3, "seed": 7}


def _image(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))


def _load(url: str) -> dict[str, object]:
    load: dict[str, object] = httpx.get(f"{url}/load").json()
    return load


class _Counting(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x) * 2
        return out


def test_the_gate_runs_compiled_code_only_where_it_is_built_until_it_opens() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    module, gate = _Counting(), CompileGate(opened=False)
    compile_module(module, gate, backend="eager")
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = module.linear(x) * 2
        frames = counters["frames"]["ok"]
        torch.testing.assert_close(module(x), expected)
        assert counters["frames"]["ok"] == frames, "a closed gate ran the compiled code"

        traced: list[int] = []

        def build() -> None:  # another thread: the one that warms up
            with gate.building():
                torch.testing.assert_close(module(x), expected)
            traced.append(counters["frames"]["ok"])

        builder = threading.Thread(target=build)
        builder.start()
        builder.join()
        assert traced, "the building thread failed"
        assert traced[0] > frames, "the building thread did not run the compiled code"
        module(x)
        assert counters["frames"]["ok"] == traced[0], "the building thread's gate leaked to this one"
        gate.open()
        torch.testing.assert_close(module(x), expected)
    assert gate.compiled_here


def test_one_thread_at_a_time_while_the_gate_is_shut_and_each_counts_its_wait() -> None:
    gate = CompileGate(opened=False)
    inside = threading.Event()
    release = threading.Event()

    def slow(x: int) -> int:
        inside.set()
        release.wait(5)
        return x + 1

    turns = OneAtATime(slow, gate)
    holder = threading.Thread(target=turns, args=(1,))
    holder.start()
    assert inside.wait(5)
    threading.Timer(0.3, release.set).start()
    assert turns(2) == 3  # waits for the holder's call to end
    holder.join()
    assert turns.waited() >= 0.25
    assert turns.waited(reset=True) >= 0.25
    assert turns.waited() == 0.0
    gate.open()
    release.clear()
    threading.Timer(0.3, release.set).start()
    both = [threading.Thread(target=turns, args=(i,)) for i in range(2)]
    started = time.monotonic()
    for thread in both:
        thread.start()
    for thread in both:
        thread.join()
    assert time.monotonic() - started < 0.55, "an open gate still took turns"


def test_the_cost_model_prices_uncompiled_work_slower_until_the_switch() -> None:
    model = CostModel(prior=0.1, slowdown=2.0)
    assert model.cost(1000, 1000, 10, 1) == pytest.approx(2.0)  # the prior, uncompiled
    model.observe(1000, 1000, 10, 1, seconds=3.0)  # measured uncompiled: 0.3 per unit
    assert model.rate == pytest.approx(0.3)
    model.compiled()
    assert model.rate == pytest.approx(0.15)  # the estimate until a compiled batch is measured
    model.observe(1000, 1000, 10, 1, seconds=1.0)
    assert model.rate == pytest.approx(0.1), "the first compiled batch replaces the estimate"


def test_serving_while_compiling_is_the_default_with_compile_only(tiny_model_dir: Path) -> None:
    def runner(**values: Any) -> PipelineRunner:
        return PipelineRunner(Settings(_env_file=None, model=str(tiny_model_dir), device="cpu", **values))

    assert runner(compile=True).serves_while_compiling
    assert not runner(compile=True).gate.opened
    assert not runner(compile=True, serve_while_compiling=False).serves_while_compiling
    assert not runner(compile=False).serves_while_compiling
    assert runner(compile=False).gate.opened  # nothing compiled: nothing to hold back
    with pytest.raises(ValueError, match="serve_while_compiling cannot be on with sequence_parallel"):
        Settings(_env_file=None, model=str(tiny_model_dir), sequence_parallel=2, serve_while_compiling=True)


@pytest.mark.parametrize(
    "device",
    [
        pytest.param({"device": "cpu"}, marks=pytest.mark.slow, id="cpu"),
        pytest.param({"device": "cuda"}, marks=pytest.mark.gpu, id="cuda-bf16"),
        pytest.param({"device": "cuda", "precision": "fp8"}, marks=pytest.mark.gpu, id="cuda-fp8"),
    ],
)
def test_requests_are_answered_while_compiling_with_the_images_compiled_ones_give(
    serve: ServerFactory, tmp_path: Path, device: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """On a GPU also with CUDA graphs of both parts (captured once the compiled pipeline serves)
    and batches of two in the warm-up; on the CPU one image a batch, so that the warm-up makes
    two calls rather than five (the requests here are single images)."""
    torch._dynamo.reset()
    on_gpu = device["device"] == "cuda"
    graphs = {"cuda_graph_parts": ["transformer", "text_encoder"]} if on_gpu else {}
    batch = 2 if on_gpu else 1
    cache = str(tmp_path / "cc")
    server = serve(compile=True, compile_cache_dir=cache, max_batch_size=batch, **device, **graphs)
    url = server.url
    load = _load(url)
    assert load["ready"] is True
    assert load["compile"] == "compiling"
    # The load signal prices the work at the uncompiled speed while the compile runs.
    assert load["seconds_per_megapixel_step"] == pytest.approx(
        PRIOR_SECONDS_PER_MEGAPIXEL_STEP * UNCOMPILED_SLOWDOWN, rel=1e-3
    )
    assert "uncompiled while it compiles" in httpx.get(f"{url}/healthz/ready").text

    with caplog.at_level(logging.INFO, logger="zimage_server.pipeline.runner"):
        before = _image(httpx.post(f"{url}/v1/images/generations", json=REQUEST, timeout=120))
    messages = [record.getMessage() for record in caplog.records]
    served = [message for message in messages if "served uncompiled beside the compile" in message]
    assert len(served) == 1, served  # with its wait for the text encoder and its step times
    assert "waiting for the text encoder, steps " in served[0]
    after_first = _load(url)
    assert after_first["compile"] == "compiling", "the answer came only once the compile was done"
    uncompiled_rate = float(str(after_first["seconds_per_megapixel_step"]))
    assert server.metrics()['zimage_compile_state{state="compiling"}'] == 1

    deadline = time.monotonic() + 900
    while _load(url)["compile"] == "compiling":
        assert time.monotonic() < deadline, "the compiled pipeline never took over"
        time.sleep(0.5)
    load = _load(url)
    assert load["compile"] == "compiled"
    estimate = uncompiled_rate / UNCOMPILED_SLOWDOWN  # until a compiled batch is measured
    assert load["seconds_per_megapixel_step"] == pytest.approx(estimate, rel=1e-3)
    runner = server.app.state.runner
    assert runner.gate.opened

    from torch._dynamo.utils import counters

    frames = counters["frames"]["ok"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="zimage_server.pipeline.runner"):
        after = _image(httpx.post(f"{url}/v1/images/generations", json=REQUEST, timeout=120))
    assert not [r for r in caplog.records if "served uncompiled" in r.getMessage()]
    assert counters["frames"]["ok"] == frames, "the request compiled something the warm-up had not"
    assert pixel_difference(after, before).mean() < 2.0, "the compiled images stray from the uncompiled ones"
    metrics = server.metrics()
    assert metrics['zimage_compile_state{state="compiled"}'] == 1
    assert metrics['zimage_compile_state{state="compiling"}'] == 0
    ready_at = metrics['zimage_startup_seconds{phase="until_ready"}']
    compiled_at = metrics['zimage_startup_seconds{phase="until_compiled"}']
    assert 0 < ready_at < compiled_at
    assert metrics['zimage_startup_seconds{phase="warmup_compile"}'] > 0
