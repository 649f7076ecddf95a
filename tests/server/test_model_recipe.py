"""One recipe makes both random-weight models: the built-in tiny one and the benchmark's one of
Z-Image-Turbo's size."""

from __future__ import annotations

import torch
from diffusers import ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from zimage_server.pipeline.tiny_model import FULL, TINY


def _parameters(module: torch.nn.Module) -> float:
    return sum(param.numel() for param in module.parameters()) / 1e9


def test_the_full_recipe_has_z_image_turbos_size() -> None:
    with torch.device("meta"):  # shapes only: no memory for 10 billion parameters
        text_encoder = Qwen3Model(Qwen3Config(**FULL.text_encoder))
        transformer = ZImageTransformer2DModel(**FULL.transformer)
    assert round(_parameters(text_encoder), 1) == 4.0  # Qwen3-4B
    assert round(_parameters(transformer), 1) == 6.2  # the 6B transformer
    assert FULL.vae["block_out_channels"] == (128, 256, 512, 512)


def test_the_tiny_recipe_keeps_the_geometry_a_client_sees() -> None:
    # 16 latent channels and patch size 2 under a VAE that scales by 8: sizes in multiples of 16.
    assert TINY.transformer["in_channels"] == 16
    assert TINY.transformer["all_patch_size"] == (2,)
    assert len(TINY.vae["block_out_channels"]) == 4  # three downsamplings: a factor of 8
    assert TINY.transformer["cap_feat_dim"] == TINY.text_encoder["hidden_size"]
