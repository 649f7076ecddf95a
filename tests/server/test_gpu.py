"""The server on a real GPU: bf16 by default, CUDA-event step timing, batching and seeds."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import pytest
import torch

from .conftest import ServerFactory, pixel_difference

pytestmark = pytest.mark.gpu


def test_the_gpu_is_chosen_with_bfloat16_by_default(serve: ServerFactory) -> None:
    server = serve(device="auto", max_batch_size=4, batch_wait_ms=500)
    runner = server.app.state.runner
    assert runner.device.type == "cuda"
    assert runner.pipe.transformer.dtype == torch.bfloat16
    assert next(runner.pipe.transformer.parameters()).device.type == "cuda"
    # The worker thread's CUDA initialisation is timed as a part of the start phase.
    assert 0 < runner.startup_seconds["cuda_init"] < runner.startup_seconds["start"]

    body = {"prompt": "a red fox", "size": "512x512", "num_inference_steps": 8}
    responses = [
        httpx.post(f"{server.url}/v1/images/generations", json={**body, "seed": 9}, timeout=60)
        for _ in range(2)
    ]
    assert [r.status_code for r in responses] == [200, 200]
    first, second = (base64.b64decode(r.json()["data"][0]["b64_json"]) for r in responses)
    assert first == second, "the same seed gives the same image on the GPU"

    metrics = server.metrics()
    assert metrics["zimage_step_duration_seconds_count"] >= 14  # 7 timed steps per 8-step request
    assert 0 < metrics["zimage_step_duration_seconds_sum"] < 10


def test_the_gpu_batches_concurrent_requests(serve: ServerFactory) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server = serve(device="auto", max_batch_size=4, batch_wait_ms=1500)
    body = {"prompt": "a tree", "size": "1024x1024", "num_inference_steps": 8}
    with ThreadPoolExecutor(4) as pool:
        responses = list(
            pool.map(
                lambda i: httpx.post(
                    f"{server.url}/v1/images/generations", json={**body, "seed": i}, timeout=60
                ),
                range(4),
            )
        )
    assert [r.status_code for r in responses] == [200] * 4
    metrics = server.metrics()
    assert metrics["zimage_batch_size_count"] == 1
    assert metrics["zimage_batch_size_sum"] == 4


def test_fp8_and_compile_serve_images(serve: ServerFactory) -> None:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability 8.9 or newer")
    server = serve(
        device="cuda",
        precision="fp8",
        cuda_graph_parts="transformer,text_encoder",
        warmup_sizes=["256x256"],
        max_batch_size=2,
    )
    runner = server.app.state.runner
    assert runner.tuning.fp8_linears == 4 * runner.pipe.transformer.config.n_layers
    import torch._inductor.config as inductor_config

    # torchao's recommended settings tune every kernel and made the fp8 cold start 10x longer
    assert not inductor_config.coordinate_descent_tuning
    assert runner.tuning.compiled == ["transformer", "vae", "text_encoder"]
    assert runner.tuning.cuda_graphs == ["text_encoder", "transformer"]  # on by default on a GPU
    transformer = runner.graphs["transformer"]
    # Ready before the compile ends (serve_while_compiling): no graph is captured beside it.
    deadline = time.monotonic() + 600
    while httpx.get(f"{server.url}/load").json()["compile"] == "compiling":
        assert transformer.captures == 0
        assert time.monotonic() < deadline, "the compiled pipeline never took over"
        time.sleep(0.5)
    assert runner.gate.opened
    replays = transformer.replays
    body = {"prompt": "a red fox", "size": "256x256", "num_inference_steps": 4, "n": 2}
    for _ in range(3):  # the text encoder's graph for this shape: run, captured, then replayed
        response = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120)
        assert response.status_code == 200
        assert all(base64.b64decode(d["b64_json"]).startswith(b"\x89PNG") for d in response.json()["data"])
    assert transformer.replays > replays
    assert runner.graphs["text_encoder"].replays >= 1


def test_cuda_graphs_replay_the_same_images(tiny_model_dir: Path) -> None:
    from zimage_server.core.config import Settings
    from zimage_server.pipeline.runner import BatchSpec, PipelineRunner

    def runner(graphs: bool) -> PipelineRunner:
        settings = Settings(
            _env_file=None,
            model=str(tiny_model_dir),
            device="cuda",
            compile=False,
            cuda_graphs=graphs,
            cuda_graph_parts=["transformer", "text_encoder"],
            warmup_sizes=["256x256"],
        )
        loaded = PipelineRunner(settings)
        loaded.load()
        return loaded

    plain, graphed = runner(False), runner(True)
    assert plain.graphs == {}
    transformer, text_encoder = graphed.graphs["transformer"], graphed.graphs["text_encoder"]
    for prompts in (["a red fox"], ["a red fox", "a lighthouse at dusk, oil painting"]):
        spec = BatchSpec(prompts, list(range(len(prompts))), 256, 256, 6)
        for _ in range(3):  # the second run captures the text encoder, the third replays it
            images = graphed.generate(spec).images
            expected = plain.generate(spec).images
            for image, reference in zip(images, expected, strict=True):
                assert pixel_difference(image, reference).max() <= 1
    assert transformer.captures == 2  # one graph per input shape
    assert transformer.replays == 2 * (6 + 6 + 4)  # 6 steps; the first run's first two do not replay
    assert text_encoder.captures == 2
    assert text_encoder.replays == 2
