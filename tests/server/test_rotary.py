"""The rotary embedding in real arithmetic gives the numbers diffusers' complex one gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zimage_server.core.config import Settings
from zimage_server.pipeline.rotary import RealRopeEmbedder, rotate, use_real_rotary
from zimage_server.pipeline.runner import BatchSpec, PipelineRunner


def test_rotate_equals_the_complex_product() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=generator, dtype=torch.float32)
    angles = torch.randn(2, 5, 4, generator=generator)
    freqs = torch.polar(torch.ones_like(angles), angles)
    expected = torch.view_as_real(
        torch.view_as_complex(x.reshape(2, 5, 3, 4, 2)) * freqs.unsqueeze(2)
    ).flatten(3)
    got = rotate(x, torch.view_as_real(freqs).unsqueeze(2))
    torch.testing.assert_close(got, expected)
    assert rotate(x.bfloat16(), torch.view_as_real(freqs).unsqueeze(2)).dtype == torch.bfloat16


def test_the_pipeline_gives_the_same_images(tiny_model_dir: Path) -> None:
    settings = Settings(_env_file=None, model=str(tiny_model_dir), device="cpu", warmup_sizes=["256x256"])
    plain, swapped = PipelineRunner(settings), PipelineRunner(settings)
    plain.load()
    swapped.load()
    assert use_real_rotary(swapped.pipe.transformer) == 2 * 1 + 2  # refiners (1 each) and main blocks (2)
    assert isinstance(swapped.pipe.transformer.rope_embedder, RealRopeEmbedder)
    assert use_real_rotary(swapped.pipe.transformer) == 0  # once is enough
    # Prompts of different lengths: the padded, masked path too.
    spec = BatchSpec(["a fox", "a much longer prompt about a red fox in the snow"], [3, 4], 256, 256, 4)
    for image, expected in zip(swapped.generate(spec).images, plain.generate(spec).images, strict=True):
        assert np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max() <= 1
