"""LoRA adapters on a real GPU, on the tiny model: bf16 and fp8, compiled, the transformer and
text encoder replayed as CUDA graphs. Swapping adapters compiles nothing and captures no new
graph, the graphs see the swapped weights (the images match eager's), and scale 0 is the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from zimage_server.core.config import Settings
from zimage_server.pipeline.runner import BatchSpec, PipelineRunner

from .conftest import pixel_difference
from .lora_files import make_adapter

pytestmark = pytest.mark.gpu

SELECTIONS: list[tuple[tuple[str, float], ...]] = [
    (("pixel", 1.0),),
    (("ink", 0.7),),
    (("ink", 1.0), ("pixel", -0.5)),
    (),
    (("pixel", 0.0),),
]


def _runner(model: Path, loras: list[dict[str, Any]], **values: Any) -> PipelineRunner:
    settings = Settings(
        _env_file=None,
        model=str(model),
        device="cuda",
        warmup_sizes=["256x256"],
        max_batch_size=2,
        loras=loras,
        **values,
    )
    runner = PipelineRunner(settings)
    runner.load()
    for spec in runner.warmup_specs():
        runner.generate(spec)
    return runner


def _image(runner: PipelineRunner, selection: tuple[tuple[str, float], ...]) -> np.ndarray:
    spec = BatchSpec(["a lighthouse on a cliff at dusk"], [3], 256, 256, 4, adapters=selection)
    return np.asarray(runner.generate(spec).images[0], dtype=np.int16)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_adapters_swap_on_the_gpu_without_compiling_or_capturing(
    tiny_model_dir: Path, tmp_path: Path, precision: str
) -> None:
    if precision == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability 8.9 or newer")
    from torch._dynamo.utils import counters

    loras = [
        {"name": "pixel", "source": str(make_adapter(tiny_model_dir, tmp_path / "pixel", rank=4, seed=1))},
        {"name": "ink", "source": str(make_adapter(tiny_model_dir, tmp_path / "ink", rank=8, seed=2))},
    ]
    eager = _runner(tiny_model_dir, loras, precision=precision, compile=False, cuda_graphs=False)
    tuned = _runner(
        tiny_model_dir, loras, precision=precision, cuda_graph_parts=["transformer", "text_encoder"]
    )
    assert tuned.tuning is not None
    assert tuned.tuning.compiled == ["transformer", "vae", "text_encoder"]
    # The adapters' slots stay bf16; the layers they wrap are the ones fp8 takes.
    slot = next(iter(tuned.adapters.slots.values()))
    assert slot.lora_A["zimage"].weight.dtype == torch.bfloat16
    if precision == "fp8":
        assert tuned.tuning.fp8_linears > 0
    graphs = tuned.graphs["transformer"]
    base = _image(tuned, ())
    _image(tuned, SELECTIONS[0])  # every shape of this test run once, adapters aside
    compiled, captured = counters["frames"]["ok"], graphs.captures
    for selection in SELECTIONS:
        found = _image(tuned, selection)
        expected = _image(eager, selection)
        assert pixel_difference(found, expected).mean() < 2.0, (
            f"{selection}: graphs or compile missed the swap"
        )
        if any(scale for _, scale in selection):
            assert pixel_difference(found, base).mean() > 3, f"{selection} does not change the image"
        else:
            assert np.array_equal(found, base), f"{selection} is not the base image"
    assert counters["frames"]["ok"] == compiled, "a swap compiled something"
    assert graphs.captures == captured, "a swap captured a new CUDA graph"
    assert tuned.adapters.last_swap_seconds < 0.1
