"""What the server is doing now, as the health endpoints report it, and the line it leaves
for the kubelet when it ends."""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


def write_termination_log(path: str, line: str) -> None:
    """``line`` where the kubelet reads the container's termination message: what
    ``kubectl describe pod`` shows as the reason it ended."""
    try:
        Path(path).write_text(line.rstrip("\n")[:4000] + "\n")
    except OSError as exc:
        logger.warning("could not write the termination message to %s: %s", path, exc)


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
