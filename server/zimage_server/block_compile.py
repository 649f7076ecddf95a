"""Regional compile of the Z-Image transformer block with its varying dimensions dynamic from
the first call.

One block class serves the noise refiner, the caption refiner and the 30 main layers, and one
compiled function serves every instance. Left to itself, dynamo traces each dimension static
first and again dynamic when it changes (the caption's length, the joined length, the batch),
per role, on every process start: 12 traces in the warm-up, each of them paid again by every
new replica even when the compiled kernels come from shared artifacts. Marking the sequence
dimension dynamic before the first call, and the batch dimension once it is above one (a
dimension of size one is always traced apart), leaves one trace per role and kind of batch:
one image or several, padded (with an attention mask) or not.

The refiners' rotary tables arrive as slices of longer ones: dynamo guards on a view's base,
and a caption's table, cut from one padded for the longest caption, has a batch stride that
no longer follows its length; either would trace again. They are copied to tensors of their
own first (a few megabytes, in the four refiner blocks only).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

# The block's inputs whose dimension 1 is the sequence (image tokens, caption tokens or both).
SEQUENCE_INPUTS = frozenset({"x", "attn_mask", "freqs_cis", "noise_mask"})
# Inputs copied to a tensor of their own before the call (see the module's note).
CONTIGUOUS_INPUTS = frozenset({"freqs_cis"})


def _packed(value: torch.Tensor) -> bool:
    """Whether every stride is the product of the sizes after it (``is_contiguous`` also
    accepts any stride on a dimension of size one, which dynamo still guards on)."""
    expected = 1
    for size, stride in zip(reversed(value.shape), reversed(value.stride()), strict=True):
        if stride != expected:
            return False
        expected *= size
    return True


def _mark(name: str, value: Any) -> Any:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if name in CONTIGUOUS_INPUTS and (value._base is not None or not _packed(value)):
        value = value.clone(memory_format=torch.contiguous_format)
    if value.shape[0] > 1:
        torch._dynamo.maybe_mark_dynamic(value, 0)
    if name in SEQUENCE_INPUTS and value.dim() > 1:
        torch._dynamo.maybe_mark_dynamic(value, 1)
    return value


class DynamicBlockForward:
    """Stands in for a block's ``forward``: marks the inputs' dimensions, then calls the
    compiled forward (the block's own, or whatever wraps it, such as sequence-parallel hooks)."""

    def __init__(self, compiled: Callable[..., Any], names: list[str]) -> None:
        self.compiled = compiled
        self.names = names

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        marked = tuple(_mark(name, value) for name, value in zip(self.names, args, strict=False))
        args = marked + args[len(marked) :]
        kwargs = {name: _mark(name, value) for name, value in kwargs.items()}
        return self.compiled(*args, **kwargs)


def compile_blocks(model: torch.nn.Module, **options: Any) -> int:
    """Compile every module of the classes ``model._repeated_blocks`` names (diffusers'
    convention) through ``DynamicBlockForward``; returns how many."""
    names = set(getattr(model, "_repeated_blocks", None) or [])
    if not names:
        raise ValueError(f"{type(model).__name__} names no repeated blocks to compile")
    count = 0
    for module in model.modules():
        if type(module).__name__ not in names or isinstance(module.forward, DynamicBlockForward):
            continue
        parameters = list(inspect.signature(type(module).forward).parameters)[1:]  # without self
        module.forward = DynamicBlockForward(torch.compile(module.forward, **options), parameters)
        count += 1
    return count
