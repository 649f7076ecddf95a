"""Z-Image attention with the rotary embedding in real arithmetic.

diffusers' ``ZSingleStreamAttnProcessor`` rotates queries and keys as complex numbers. Inductor
does not generate code for complex operators ("Performance may be worse than eager"), so in a
compiled block that rotation stays unfused. The same rotation written on (real, imaginary)
pairs is plain elementwise arithmetic that Inductor fuses with the norms around it. The
result equals the complex product up to float rounding (tests/server/test_rotary.py).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x`` (B, S, H, D) rotated by ``rotation`` (B, S, 1, D/2, 2): the (cos, sin) pairs."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = rotation[..., 0], rotation[..., 1]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2).type_as(x)


class RealRotaryAttnProcessor(ZSingleStreamAttnProcessor):  # type: ignore[misc]
    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            real = torch.view_as_real(freqs_cis) if freqs_cis.is_complex() else freqs_cis
            rotation = real.unsqueeze(2)
            query, key = rotate(query, rotation), rotate(key, rotation)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]  # (B, S) -> broadcast over heads and queries
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        output: torch.Tensor = attn.to_out[0](out.flatten(2, 3).to(query.dtype))
        if len(attn.to_out) > 1:
            output = attn.to_out[1](output)
        return output


class RealRopeEmbedder:
    """The model's RoPE table lookup, handing out (cos, sin) pairs instead of complex numbers,
    so no complex tensor enters the compiled blocks."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(self.inner(ids))


def use_real_rotary(transformer: Any) -> int:
    """Swap the processor of every Z-Image attention and the RoPE lookup; return how many
    processors were swapped."""
    if not isinstance(transformer.rope_embedder, RealRopeEmbedder):
        transformer.rope_embedder = RealRopeEmbedder(transformer.rope_embedder)
    swapped = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, ZSingleStreamAttnProcessor) and not isinstance(
            processor, RealRotaryAttnProcessor
        ):
            module.set_processor(RealRotaryAttnProcessor())
            swapped += 1
    return swapped
