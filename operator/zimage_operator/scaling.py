"""The built-in autoscaler's decision: replicas from the diffusion load of the ready pods.

Pure: the caller reads the pods' ``/load`` and keeps the history; ``decide`` only computes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .spec import AutoscalingSpec

# Scale down by at most this fraction of the current replicas per decision (at least one pod).
MAX_SCALE_DOWN_FRACTION = 0.5


@dataclass(frozen=True)
class PodLoad:
    name: str
    reachable: bool
    queue_depth: int = 0
    in_flight: int = 0
    pending_gpu_seconds: float = 0.0
    error: str | None = None
    # What the pod did with the shared compile artifacts, and the file's name (its /load says),
    # and whether the server itself says it is ready (warmed up, its artifacts settled).
    artifacts: str | None = None
    artifact: str | None = None
    ready: bool = True
    # The LoRA adapters the pod loaded, and those it could not with why (its /load says).
    adapters: tuple[str, ...] = ()
    adapters_failed: tuple[tuple[str, str], ...] = ()

    @property
    def busy(self) -> bool:
        # A pod we cannot read is not known to be idle.
        return not self.reachable or self.queue_depth > 0 or self.in_flight > 0


@dataclass(frozen=True)
class Decision:
    desired: int
    recommended: int
    load: int  # requests queued or running on the reachable pods
    pending_gpu_seconds: float
    reason: str
    unreachable: tuple[str, ...]


@dataclass
class History:
    """One service's recent recommendations, for the scale-down stabilization window: each
    recommendation with its wall-clock time, those that can no longer be the window's highest
    dropped (a later one as high or higher), so the first is the highest in the window.

    It lives in ``status.autoscaling.recommendations`` too, written when its values change: an
    operator that restarts, or a standby that takes over, continues the window (``restore``)."""

    entries: deque[tuple[float, int]] = field(default_factory=deque)
    written: tuple[int, str] | None = None  # the (desired, reason) last written to the status
    restored: bool = False

    def add(self, now: float, recommended: int, window: float) -> int:
        """Record ``recommended``; return the highest recommendation within ``window``."""
        while self.entries and self.entries[-1][1] <= recommended:
            self.entries.pop()
        self.entries.append((now, recommended))
        while self.entries[0][0] < now - window:
            self.entries.popleft()
        return self.entries[0][1]

    def values(self) -> list[int]:
        return [value for _, value in self.entries]

    def to_status(self) -> list[dict[str, Any]]:
        """The entries as the status keeps them, each time rounded up to the second (a window
        continued from them ends no earlier than this one)."""
        return [
            {
                "time": datetime.fromtimestamp(math.ceil(at), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "replicas": value,
            }
            for at, value in self.entries
        ]

    def restore(self, recorded: Any, now: float) -> None:
        """Take the window from the status, once, if this history has none yet. The last entry's
        value may have been recommended until the moment the writer stopped, which the status
        cannot say: it counts as recommended now, so the window never closes early."""
        if self.restored or self.entries:
            return
        self.restored = True
        for item in recorded if isinstance(recorded, list) else []:
            try:
                at = datetime.strptime(str(item["time"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
                self.entries.append((at.timestamp(), int(item["replicas"])))
            except (KeyError, TypeError, ValueError):
                continue
        if self.entries:
            self.entries[-1] = (now, self.entries[-1][1])


def decide(
    spec: AutoscalingSpec,
    current: int,
    pods: list[PodLoad],
    history: History,
    now: float,
    floor: int | None = None,
) -> Decision:
    """``floor``: the fewest replicas allowed (default ``spec.min_replicas``)."""
    reachable = [pod for pod in pods if pod.reachable]
    unreachable = tuple(sorted(pod.name for pod in pods if not pod.reachable))
    load = sum(pod.queue_depth + pod.in_flight for pod in reachable)
    pending = sum(pod.pending_gpu_seconds for pod in reachable)
    recommended = math.ceil(load / spec.target_queue_per_replica)
    low, high = spec.min_replicas if floor is None else floor, spec.max_replicas
    recommended = max(low, min(high, recommended))
    stable = history.add(now, recommended, spec.scale_down_stabilization_seconds)

    if current > high:
        desired, reason = high, f"clamped to maxReplicas {high}"
    elif recommended > current:
        desired, reason = (
            recommended,
            f"load {load} needs {recommended} replicas at {spec.target_queue_per_replica} each",
        )
    elif stable < current:
        step = max(1, math.floor(current * MAX_SCALE_DOWN_FRACTION))
        busy = sum(1 for pod in pods if pod.busy)
        desired = max(stable, current - step, busy, low)
        reason = (
            f"load {load} has needed at most {stable} replicas for {spec.scale_down_stabilization_seconds}s"
        )
        if desired == current:
            reason = f"{busy} busy or unreachable pods hold the scale at {current}"
    else:
        desired, reason = max(low, min(high, current)), f"load {load} fits {current} replicas"
    if unreachable:
        reason += f"; unreachable: {', '.join(unreachable)}"
    return Decision(desired, recommended, load, pending, reason, unreachable)


# What a replica did with the shared artifacts, as its /load names it: these found or wrote one.
ARTIFACT_PRESENT = ("loaded", "saved", "exists")


def artifacts_status(pods: list[PodLoad]) -> dict[str, Any]:
    """``status.compileArtifacts`` from the ready pods' reports: Available when a replica found or
    wrote the artifact for its GPU and versions, Missing when they all compiled without one
    (none saved yet, or a save failed), Unknown when no ready pod answered."""
    reports = [pod for pod in pods if pod.reachable and pod.ready and pod.artifacts is not None]
    counts: dict[str, int] = {}
    for pod in reports:
        counts[str(pod.artifacts)] = counts.get(str(pod.artifacts), 0) + 1
    names = sorted({pod.artifact for pod in reports if pod.artifact and pod.artifacts in ARTIFACT_PRESENT})
    present = sum(counts.get(state, 0) for state in ARTIFACT_PRESENT)
    if present:
        state = "Available"
        message = (
            f"{present} of {len(pods)} ready replicas use the shared compile artifacts ({', '.join(names)})"
        )
    elif reports:
        state = "Missing"
        detail = ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))
        message = (
            f"the ready replicas compiled without shared compile artifacts ({detail}); a replica that "
            "could not save them says why in its log"
        )
    else:
        state = "Unknown"
        message = "no ready replica has reported on the compile artifacts yet"
    return {"state": state, "message": message, "artifacts": names, "pods": counts}


def adapters_status(pods: list[PodLoad]) -> dict[str, Any]:
    """``status.adapters`` from the ready pods' reports: what each loaded, what all loaded, and
    each failure with its pod and reason."""
    reports = sorted((pod for pod in pods if pod.reachable and pod.ready), key=lambda pod: pod.name)
    loaded = (
        [name for name in reports[0].adapters if all(name in pod.adapters for pod in reports)]
        if reports
        else []
    )
    return {
        "loaded": loaded,
        "pods": {pod.name: list(pod.adapters) for pod in reports},
        "failed": [
            {"name": name, "pod": pod.name, "reason": reason}
            for pod in reports
            for name, reason in pod.adapters_failed
        ],
    }
