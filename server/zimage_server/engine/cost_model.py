"""Pricing work in GPU-seconds, from what the server has measured, for the load signal."""

from __future__ import annotations

import threading

# Before anything is measured: about what the real model takes on an H100 at batch 1
# (about 1 s for a 1024x1024 image in 8 steps: ~0.12 s per megapixel-step).
PRIOR_SECONDS_PER_MEGAPIXEL_STEP = 0.12
# How much longer an image takes uncompiled, while a replica serves as it compiles: plain
# diffusers took 1.69x the compiled bf16 server's time per image on an H100
# (docs/performance.md).
UNCOMPILED_SLOWDOWN = 1.7


class CostModel:
    """Seconds per (megapixel x step x image), a moving average over measured batches.

    ``slowdown``: the work runs uncompiled for now, this many times slower than compiled; the
    prior is scaled by it, and ``compiled()`` divides it out once the compiled code takes over
    (measurements start again from that estimate)."""

    def __init__(
        self, prior: float = PRIOR_SECONDS_PER_MEGAPIXEL_STEP, weight: float = 0.2, slowdown: float = 1.0
    ) -> None:
        self.rate = prior * slowdown
        self.weight = weight
        self.slowdown = slowdown
        self.measured = 0
        self._lock = threading.Lock()

    @staticmethod
    def units(width: int, height: int, steps: int, images: int) -> float:
        return width * height / 1e6 * steps * images

    def observe(self, width: int, height: int, steps: int, images: int, seconds: float) -> None:
        units = self.units(width, height, steps, images)
        if units <= 0 or seconds <= 0:
            return
        with self._lock:
            rate = seconds / units
            # The first measurement replaces the prior outright; later ones are averaged in.
            self.rate = rate if self.measured == 0 else (1 - self.weight) * self.rate + self.weight * rate
            self.measured += 1

    def compiled(self) -> None:
        """The compiled code runs from now on: the uncompiled rate over the slowdown, until the
        first compiled batch replaces it."""
        with self._lock:
            self.rate /= self.slowdown
            self.slowdown = 1.0
            self.measured = 0

    def cost(self, width: int, height: int, steps: int, images: int) -> float:
        return self.rate * self.units(width, height, steps, images)
