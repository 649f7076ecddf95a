"""Spec changes that arrive together roll the pods once.

Each change to a ZImageService's spec (a new ``metadata.generation``) that would reach a
Deployment that already runs is held until the spec has been quiet for ``QUIET_SECONDS``, but
never longer than ``MAX_HOLD_SECONDS`` after the first change held: 50 patches in 10 s make at
most two rollouts instead of one per patch, each of which restarts GPU pods whose model takes a
while to load. A new service, and everything else a pass does, is never held.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

QUIET_SECONDS = 2.0
MAX_HOLD_SECONDS = 10.0


@dataclass
class _Changes:
    generation: int
    last: float  # when the generation last changed
    since: float | None = None  # when the first change still held arrived


class ChangeCoalescer:
    def __init__(
        self,
        quiet: float = QUIET_SECONDS,
        max_hold: float = MAX_HOLD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quiet, self.max_hold, self.clock = quiet, max_hold, clock
        self._services: dict[str, _Changes] = {}
        self._lock = threading.Lock()

    def hold(self, key: str, generation: int) -> float | None:
        """Seconds until the rollout of ``generation`` of service ``key`` may go ahead, or None
        when it may go ahead now."""
        now = self.clock()
        with self._lock:
            seen = self._services.get(key)
            if seen is None:  # first sight (a new service, or the operator just started): no hold
                self._services[key] = _Changes(generation, float("-inf"))
                return None
            if generation != seen.generation:
                seen.generation, seen.last = generation, now
                if seen.since is None:
                    seen.since = now
            if seen.since is None:
                return None
            wait = self._due_at(seen) - now
            if wait <= 0:
                seen.since = None
                return None
            return wait

    def due(self, key: str) -> bool:
        """Whether a held rollout of service ``key`` may go ahead now."""
        now = self.clock()
        with self._lock:
            seen = self._services.get(key)
            if seen is None or seen.since is None:
                return False
            return now >= self._due_at(seen)

    def _due_at(self, seen: _Changes) -> float:
        """When a held rollout goes ahead: the spec quiet for ``quiet``, or ``max_hold`` after
        the first change held."""
        assert seen.since is not None
        return min(seen.last + self.quiet, seen.since + self.max_hold)

    def forget(self, key: str) -> None:
        with self._lock:
            self._services.pop(key, None)
