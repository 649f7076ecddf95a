"""Pricing work in GPU-seconds, from what the server has measured, for the load signal."""

from __future__ import annotations

import threading

# Before anything is measured: about what the real model takes on an H100 at batch 1
# (about 1 s for a 1024x1024 image in 8 steps: ~0.12 s per megapixel-step).
PRIOR_SECONDS_PER_MEGAPIXEL_STEP = 0.12


class CostModel:
    """Seconds per (megapixel x step x image), a moving average over measured batches."""

    def __init__(self, prior: float = PRIOR_SECONDS_PER_MEGAPIXEL_STEP, weight: float = 0.2) -> None:
        self.rate = prior
        self.weight = weight
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

    def cost(self, width: int, height: int, steps: int, images: int) -> float:
        return self.rate * self.units(width, height, steps, images)
