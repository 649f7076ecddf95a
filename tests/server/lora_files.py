"""LoRA adapters for the tiny model, made the way a user's are: PEFT's ``LoraConfig`` on the
transformer, trained (here: random factors, large enough to change the image visibly) and saved
with ``ZImagePipeline.save_lora_weights`` in the diffusers LoRA format, with its metadata."""

from __future__ import annotations

from pathlib import Path

import torch

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD = ("w1", "w2", "w3")


def make_adapter(
    model_dir: Path,
    out: Path,
    *,
    rank: int = 4,
    seed: int = 0,
    alpha: int | None = None,
    targets: tuple[str, ...] = ATTENTION + FEED_FORWARD,
    strength: float = 0.5,
) -> Path:
    """Write an adapter for ``model_dir``'s transformer to ``out/pytorch_lora_weights.safetensors``."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = ZImageTransformer2DModel.from_pretrained(model_dir / "transformer")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets))
    transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * strength)
    state = get_peft_model_state_dict(transformer)
    out.mkdir(parents=True, exist_ok=True)
    ZImagePipeline.save_lora_weights(
        out,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=config.to_dict(),  # type: ignore[no-untyped-call]
    )
    return out / "pytorch_lora_weights.safetensors"
