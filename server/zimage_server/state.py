"""What the server is doing now, as the health endpoints report it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Phase(enum.StrEnum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ServerState:
    phase: Phase = Phase.LOADING
    detail: str = "loading the model"
    since: float = field(default_factory=time.time)
    draining: bool = False

    def set(self, phase: Phase, detail: str) -> None:
        self.phase = phase
        self.detail = detail
        self.since = time.time()

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def serving(self) -> bool:
        """Ready and not draining: what the readiness probe reports."""
        return self.ready and not self.draining
