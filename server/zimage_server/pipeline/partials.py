"""Partial images while a batch denoises: the model's current estimate of the clean image.

Z-Image's scheduler is flow matching with Euler steps: ``x_next = x + (s_next - s) * v`` where
``x = (1 - s) * x0 + s * noise``. Two consecutive latents give the velocity ``v``, and from it
the clean latent the model expects now, ``x0 = x_next - s_next * v``. That estimate is decoded
with the VAE, one image at a time (batch 1, a shape the warm-up compiled), on the worker thread
between two steps: each partial image costs the whole batch one VAE decode.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from PIL import Image


class StepObserver(Protocol):
    """Told about a batch as it runs, from the worker thread (so: quick, and thread-safe)."""

    def step(self, done: int, steps: int) -> None: ...

    def partial(self, item: int, index: int, image: Image.Image, seconds: float) -> None: ...


def partial_steps(steps: int, count: int) -> list[int]:
    """The 0-based steps after which the ``count`` partial images are taken: evenly spaced,
    never after the first step (the estimate needs the latent before a step) nor after the
    last (that is the final image). Fewer than ``count`` when there are not enough steps: the
    final image comes first, as the OpenAI API allows."""
    chosen: list[int] = []
    for index in range(count):
        step = min(max((index + 1) * steps // (count + 1), 1), steps - 2)
        if step >= 1 and step not in chosen:
            chosen.append(step)
    return chosen


def clean_estimate(
    before: torch.Tensor, after: torch.Tensor, sigma: float, sigma_next: float
) -> torch.Tensor:
    """The clean latent implied by one Euler step from ``before`` (at ``sigma``) to ``after``."""
    velocity = (after - before) / (sigma_next - sigma)
    return after - sigma_next * velocity


class PartialDecoder:
    """The pipeline's step callback part that makes partial images for the items that ask."""

    def __init__(self, pipe: Any, partials: Sequence[int], steps: int, observer: StepObserver) -> None:
        self.pipe = pipe
        self.observer = observer
        self.plan = [partial_steps(steps, count) for count in partials]
        self.previous: torch.Tensor | None = None
        self.decoded = 0

    @property
    def wanted(self) -> bool:
        return any(self.plan)

    def after_step(self, step: int, latents: torch.Tensor) -> None:
        previous, self.previous = self.previous, latents
        if previous is None:
            return
        items = [item for item, steps in enumerate(self.plan) if step in steps]
        if not items:
            return
        # An edit's schedule starts part way (its begin index): step counts from there.
        sigmas = self.pipe.scheduler.sigmas
        start = getattr(self.pipe.scheduler, "begin_index", None) or 0
        sigma, sigma_next = float(sigmas[start + step]), float(sigmas[start + step + 1])
        for item in items:
            started = time.perf_counter()
            estimate = clean_estimate(previous[item : item + 1], latents[item : item + 1], sigma, sigma_next)
            image = self.decode(estimate)  # ends with the copy to the host: the time is the GPU's
            self.observer.partial(item, self.plan[item].index(step), image, time.perf_counter() - started)
            self.decoded += 1

    def decode(self, latents: torch.Tensor) -> Image.Image:
        vae = self.pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        (pil,) = to_pil(self.pipe.image_processor.postprocess(image, output_type="pt"))
        return pil


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[0, 1] float images (N, C, H, W) on any device -> PIL images.

    The conversion to 8 bits happens on the device and only bytes cross to the host, so the
    worker thread spends little time holding the GIL on a large image.
    """
    pixels = (images * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()
    return [Image.fromarray(array) for array in pixels.numpy()]
