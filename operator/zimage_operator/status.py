"""Status of a ZImageService, computed from its children: conditions keyed by type with
CamelCase reasons, ``observedGeneration``, replica counts and the endpoint."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

# The start of the server's termination message when liveness failed for VRAM.
VRAM_WORDS = "zimage: VRAM limit exceeded"
CONDITION_TYPES = ("Ready", "Progressing", "Degraded", "ModelReady", "ScalingLimited")
# Container states that mean a pod will not get better by itself.
FAILING_REASONS = {
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str

    def as_dict(self, generation: int, now: str) -> dict[str, Any]:
        return {
            "type": self.type,
            "status": "True" if self.status else "False",
            "reason": self.reason,
            "message": self.message,
            "lastTransitionTime": now,
            "observedGeneration": generation,
        }


@dataclass(frozen=True)
class ModelState:
    ready: bool
    reason: str
    message: str


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def model_state(
    needs_cache: bool, job: dict[str, Any] | None, job_pods: list[dict[str, Any]] | None = None
) -> ModelState:
    """``job_pods``: the prefetch Job's pods, whose scheduling and containers say why it is stuck."""
    if not needs_cache:
        return ModelState(True, "NoCacheNeeded", "the server loads the model itself")
    if job is None:
        return ModelState(False, "CachePending", "the prefetch Job is being created")
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return ModelState(True, "CachePopulated", "the model cache is filled")
        if condition.get("type") == "Failed":
            detail = condition.get("message") or condition.get("reason") or "it failed"
            return ModelState(False, "CacheFailed", f"the prefetch Job failed: {detail}")
    stuck = unschedulable_pods(job_pods or []) + failing_pods(job_pods or [])
    if stuck:
        return ModelState(False, "CacheBlocked", f"the prefetch Job cannot run: {'; '.join(stuck[:3])}")
    if not any(_started(pod) for pod in job_pods or []):
        return ModelState(False, "CachePending", "the prefetch Job's pod is starting")
    return ModelState(False, "CacheDownloading", "the prefetch Job is filling the model cache")


def _started(pod: dict[str, Any]) -> bool:
    return any("running" in (status.get("state") or {}) for status in _container_statuses(pod))


def _container_statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    status = pod.get("status") or {}
    return [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]


def unschedulable_pods(pods: list[dict[str, Any]]) -> list[str]:
    """``pod: the scheduler's message`` for each pod the scheduler could not place."""
    found = []
    for pod in pods:
        for condition in (pod.get("status") or {}).get("conditions") or []:
            if (
                condition.get("type") == "PodScheduled"
                and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"
            ):
                found.append(f"{pod['metadata']['name']}: {condition.get('message') or 'unschedulable'}")
    return found


def failing_pods(pods: list[dict[str, Any]]) -> list[str]:
    """``pod: reason: the kubelet's message`` for each pod whose container is stuck failing.

    A crash loop passes through waiting (CrashLoopBackOff), running (not ready) and terminated
    states: each is reported in the same words while the container has not come up ready since
    it last exited with an error, so the condition holds while the loop lasts."""
    found = []
    for pod in pods:
        for status in _container_statuses(pod):
            state = status.get("state") or {}
            waiting = state.get("waiting") or {}
            crashed = _crashed(status)
            if crashed is not None and waiting.get("reason") in (None, "CrashLoopBackOff"):
                found.append(f"{pod['metadata']['name']}: CrashLoopBackOff: {crashed}")
            elif waiting.get("reason") in FAILING_REASONS:
                detail = f": {waiting['message']}" if waiting.get("message") else ""
                found.append(f"{pod['metadata']['name']}: {waiting['reason']}{detail}")
    return found


def _crashed(status: dict[str, Any]) -> str | None:
    """What a container that keeps exiting last exited with, while it is not ready; None for a
    container that is ready, never exited with an error, or was restarted for its VRAM (which
    has its own Event and status)."""
    if status.get("ready"):
        return None
    state = status.get("state") or {}
    terminated = state.get("terminated") or (status.get("lastState") or {}).get("terminated") or {}
    code = terminated.get("exitCode")
    if not code or VRAM_WORDS in (terminated.get("message") or ""):
        return None
    if "terminated" not in state and int(status.get("restartCount") or 0) < 1:
        return None
    reason = f" ({terminated['reason']})" if terminated.get("reason") else ""
    return f"container {status.get('name', '')} keeps exiting, last with code {code}{reason}"


def compute_conditions(
    *,
    invalid: str | None,
    apply_error: str | None,
    conflict: str | None = None,
    blocked: tuple[str, str] | None = None,
    model: ModelState,
    desired_replicas: int,
    deployment: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    pod_problems: list[str] | None = None,
    rollout_held: str | None = None,
    refreshing: str | None = None,
    adapter_failures: list[str] | None = None,
) -> list[Condition]:
    """``refreshing``: the model cache is being filled again (another model or adapter) while
    the replicas keep serving what they have; ``adapter_failures``: adapters a ready replica
    could not load, as its /load said."""
    if invalid is not None:
        return [
            Condition("Ready", False, "InvalidSpec", invalid),
            Condition("Progressing", False, "InvalidSpec", "fix the spec to continue"),
            Condition("Degraded", True, "InvalidSpec", invalid),
            Condition("ModelReady", False, "InvalidSpec", "fix the spec to continue"),
        ]
    if conflict is not None:
        return [
            Condition("Ready", False, "NameConflict", conflict),
            Condition("Progressing", False, "NameConflict", "blocked until the names are free"),
            Condition("Degraded", True, "NameConflict", conflict),
            Condition("ModelReady", model.ready, model.reason, model.message),
        ]
    dep_status = (deployment or {}).get("status") or {}
    dep_meta = (deployment or {}).get("metadata") or {}
    ready = int(dep_status.get("readyReplicas") or 0)
    updated = int(dep_status.get("updatedReplicas") or 0)
    total = int(dep_status.get("replicas") or 0)
    observed = int(dep_status.get("observedGeneration") or 0) >= int(dep_meta.get("generation") or 1)
    rolled_out = (
        deployment is not None
        and observed
        and updated == desired_replicas
        and total == desired_replicas
        and ready == desired_replicas
    )

    if not model.ready and refreshing is None:
        ready_condition = Condition("Ready", False, "WaitingForModel", model.message)
    elif desired_replicas == 0:
        ready_condition = Condition("Ready", False, "ScaledToZero", "no replicas are requested")
    elif ready > 0:
        ready_condition = Condition("Ready", True, "Serving", f"{ready} of {desired_replicas} replicas ready")
    else:
        ready_condition = Condition(
            "Ready", False, "NoReadyReplicas", f"0 of {desired_replicas} replicas ready"
        )

    if refreshing is not None:
        progressing = Condition("Progressing", True, "RefreshingCache", refreshing)
    elif not model.ready:
        progressing = Condition("Progressing", True, "WaitingForModel", model.message)
    elif apply_error is not None:
        progressing = Condition("Progressing", False, "ApplyFailed", "stopped until the write is accepted")
    elif rollout_held is not None:
        progressing = Condition("Progressing", True, "CoalescingChanges", rollout_held)
    elif rolled_out:
        progressing = Condition("Progressing", False, "RolloutComplete", f"{ready} replicas up to date")
    else:
        progressing = Condition(
            "Progressing",
            True,
            "RollingOut",
            f"{updated} of {desired_replicas} replicas updated, {ready} ready",
        )

    failing = failing_pods(pods) + list(pod_problems or [])
    unschedulable = unschedulable_pods(pods)
    dep_problem = _deployment_problem(dep_status)
    if blocked is not None:
        degraded = Condition("Degraded", True, *blocked)
    elif apply_error is not None:
        degraded = Condition("Degraded", True, "ApplyFailed", apply_error)
    elif model.reason in ("CacheFailed", "CacheBlocked"):
        degraded = Condition("Degraded", True, model.reason, model.message)
    elif failing:
        degraded = Condition("Degraded", True, "PodsFailing", "; ".join(sorted(failing)[:5]))
    elif unschedulable:
        degraded = Condition("Degraded", True, "Unschedulable", "; ".join(sorted(unschedulable)[:5]))
    elif adapter_failures:
        degraded = Condition("Degraded", True, "AdapterLoadFailed", "; ".join(adapter_failures[:5]))
    elif dep_problem is not None:
        degraded = Condition("Degraded", True, *dep_problem)
    else:
        degraded = Condition("Degraded", False, "AsExpected", "no problems found")

    return [
        ready_condition,
        progressing,
        degraded,
        Condition("ModelReady", model.ready, model.reason, model.message),
    ]


def scaling_condition(mode: str, replicas: int, min_replicas: int, max_replicas: int) -> Condition:
    """Whether ``spec.replicas`` (what ``kubectl scale zis`` sets) takes effect: with an
    autoscaler it is only a floor, and one below ``minReplicas`` changes nothing."""
    if mode == "none":
        return Condition("ScalingLimited", False, "AsRequested", f"{replicas} replicas as spec.replicas asks")
    if replicas < min_replicas:
        return Condition(
            "ScalingLimited",
            True,
            "BelowMinReplicas",
            f"spec.replicas {replicas} has no effect: with autoscaling mode {mode} it is a floor, and "
            f"autoscaling.minReplicas {min_replicas} is higher; the autoscaler keeps {min_replicas} to "
            f"{max_replicas} replicas. To stop the service, set autoscaling.mode none and replicas 0",
        )
    floor = min(replicas, max_replicas)
    return Condition(
        "ScalingLimited",
        False,
        "WithinLimits",
        f"autoscaling mode {mode} keeps {floor} to {max_replicas} replicas (spec.replicas is the floor)",
    )


def _deployment_problem(dep_status: dict[str, Any]) -> tuple[str, str] | None:
    for condition in dep_status.get("conditions") or []:
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return "ReplicaFailure", str(condition.get("message", ""))
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return "ProgressDeadlineExceeded", str(condition.get("message", ""))
    return None


def merge_conditions(
    previous: list[dict[str, Any]], current: list[Condition], generation: int, now: str
) -> list[dict[str, Any]]:
    """New condition dicts, keeping ``lastTransitionTime`` where the status did not change."""
    old = {c.get("type"): c for c in previous or []}
    merged = []
    for condition in current:
        entry = condition.as_dict(generation, now)
        before = old.get(condition.type)
        if before is not None and before.get("status") == entry["status"]:
            entry["lastTransitionTime"] = before.get("lastTransitionTime", now)
        merged.append(entry)
    return merged


def transitions(previous: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conditions whose status or reason changed: each is worth an Event."""
    old = {c.get("type"): c for c in previous or []}
    changed = []
    for condition in current:
        before = old.get(condition["type"])
        if before is None or (before.get("status"), before.get("reason")) != (
            condition["status"],
            condition["reason"],
        ):
            changed.append(condition)
    return changed
