"""The built-in autoscaler's pass over one service: read the load of its ready pods, decide
(scaling.py), and scale through the reconciler. One slow or unreachable pod cannot stall it:
reads run concurrently with a short timeout, and a pod that does not answer is reported, not idle.
The operator's periodic passes (passes.py) run it, from what the operator's watches hold: an
idle service costs the API server nothing between resyncs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx

from . import builders
from .builders import Owner
from .config import OperatorSettings
from .kube import Kube
from .metrics import DECISIONS
from .reconcile import EventSink, Reconciler, owns
from .scaling import Decision, History, PodLoad, adapters_status, artifacts_status, decide
from .spec import InvalidSpecError, parse_spec
from .status import now_rfc3339

logger = logging.getLogger(__name__)


def ready_pods(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ready = []
    for pod in pods:
        status = pod.get("status") or {}
        if pod["metadata"].get("deletionTimestamp") or not status.get("podIP"):
            continue
        if any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        ):
            ready.append(pod)
    return ready


class Autoscaler:
    """Scales one ZImageService at a time; each service's daemon calls ``scale`` on its cadence."""

    def __init__(
        self, kube: Kube, reconciler: Reconciler, settings: OperatorSettings, post_event: EventSink
    ) -> None:
        self.kube = kube
        self.reconciler = reconciler
        self.settings = settings
        self.post_event = post_event

    async def scale(
        self,
        http: httpx.AsyncClient,
        body: Mapping[str, Any],
        deployment: dict[str, Any] | None,
        pods: list[dict[str, Any]],
        history: History,
    ) -> None:
        """One pass over the service ``body`` (Kopf's copy, kept fresh by its watch), with its
        Deployment and server pods as the operator's watches last saw them: no API read."""
        body = dict(body)
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return
        try:
            spec = parse_spec(body.get("spec"))
        except InvalidSpecError:
            return  # the reconciler reports it
        artifacts = spec.runtime.compile_artifacts.enabled
        if spec.autoscaling.mode != "builtin" and not artifacts and not spec.loras:
            return
        owner = Owner(meta["name"], meta["namespace"], meta["uid"])
        if deployment is None or not owns(deployment, owner):
            return  # not made yet, or someone else's (the reconciler reports a NameConflict)
        current = int((deployment.get("spec") or {}).get("replicas") or 0)
        if current == 0 and spec.needs_cache:
            return  # waiting for the model cache; the reconciler owns this
        loads = await asyncio.gather(*(self._read(http, pod) for pod in ready_pods(pods)))
        if artifacts:
            await self._record_artifacts(body, owner, list(loads))
        if spec.loras:
            await self._record_adapters(body, owner, list(loads))
        if spec.autoscaling.mode != "builtin":
            return
        now = time.time()  # wall clock: the window is kept in the status, across operators
        history.restore(((body.get("status") or {}).get("autoscaling") or {}).get("recommendations"), now)
        window_before = history.values()
        decision = decide(spec.autoscaling, current, list(loads), history, now, builders.replica_floor(spec))
        direction = "hold" if decision.desired == current else "up" if decision.desired > current else "down"
        DECISIONS.labels(direction).inc()
        await self._record(body, owner, current, decision, history, window_before != history.values())

    async def _read(self, http: httpx.AsyncClient, pod: dict[str, Any]) -> PodLoad:
        name = pod["metadata"]["name"]
        url = f"http://{pod['status']['podIP']}:{builders.SERVER_PORT}/load"
        try:
            response = await http.get(url)
            response.raise_for_status()
            load = response.json()
            artifacts = load.get("compile_artifacts") or {}  # absent from older servers
            adapters = load.get("adapters") or {}
            return PodLoad(
                name,
                True,
                int(load.get("queue_depth", 0)),
                int(load.get("in_flight", 0)),
                float(load.get("pending_gpu_seconds", 0.0)),
                artifacts=artifacts.get("state"),
                artifact=artifact_file(artifacts.get("artifact")),
                ready=bool(load.get("ready", True)),
                adapters=tuple(str(name) for name in adapters.get("loaded") or []),
                adapters_failed=tuple(
                    (str(name), str(reason)) for name, reason in (adapters.get("failed") or {}).items()
                ),
            )
        except (httpx.HTTPError, ValueError) as exc:
            return PodLoad(name, False, error=f"{type(exc).__name__}: {exc}")

    async def _record_artifacts(self, body: dict[str, Any], owner: Owner, loads: list[PodLoad]) -> None:
        """``status.compileArtifacts``, written when what the ready pods report changes."""
        await self._record_report(body, owner, "compileArtifacts", artifacts_status(loads))

    async def _record_adapters(self, body: dict[str, Any], owner: Owner, loads: list[PodLoad]) -> None:
        """``status.adapters``, written when what the ready pods report changes; a change in
        what failed is reconciled at once (the Degraded condition says it)."""
        record = adapters_status(loads)
        previous = await self._record_report(body, owner, "adapters", record)
        if previous is not None and previous.get("failed", []) != record["failed"]:
            await asyncio.to_thread(self.reconciler.reconcile, owner.namespace, owner.name)

    async def _record_report(
        self, body: dict[str, Any], owner: Owner, field: str, record: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Write ``record`` (what the ready pods report, with a ``pods`` map) as ``status.FIELD``
        when it differs from what is there; return what was there, or None when nothing changed."""
        previous: dict[str, Any] = (body.get("status") or {}).get(field) or {}
        if all(previous.get(key) == value for key, value in record.items()):
            return None
        # A merge patch merges maps: a key of ``pods`` no pod reports any more is removed by name.
        gone = {key: None for key in previous.get("pods") or {} if key not in record["pods"]}
        patch = {**record, "pods": {**gone, **record["pods"]}, "observedTime": now_rfc3339()}
        await asyncio.to_thread(self.kube.patch_status, owner.namespace, owner.name, {field: patch})
        return previous

    async def _record(
        self,
        body: dict[str, Any],
        owner: Owner,
        current: int,
        decision: Decision,
        history: History,
        window_changed: bool,
    ) -> None:
        previous = (body.get("status") or {}).get("autoscaling") or {}
        scaled = decision.desired != current
        summary = (decision.desired, decision.reason)
        unchanged = history.written == summary and previous.get("desiredReplicas") == decision.desired
        if not scaled and unchanged and not window_changed:
            return
        record = {
            "desiredReplicas": decision.desired,
            "currentReplicas": current,
            "currentLoad": decision.load,
            "pendingGpuSeconds": round(decision.pending_gpu_seconds, 3),
            "reason": decision.reason,
            "unreachablePods": list(decision.unreachable),
            "lastScaleTime": now_rfc3339() if scaled else previous.get("lastScaleTime"),
            # The scale-down window: what an operator after this one continues from.
            "recommendations": history.to_status(),
        }
        await asyncio.to_thread(self.kube.patch_status, owner.namespace, owner.name, {"autoscaling": record})
        history.written = summary
        if scaled:
            verb = "ScaledUp" if decision.desired > current else "ScaledDown"
            key = f"{owner.namespace}/{owner.name}"
            logger.info("%s %s: %d -> %d (%s)", verb, key, current, decision.desired, decision.reason)
            message = f"{current} -> {decision.desired} replicas: {decision.reason}"
            await asyncio.to_thread(self.post_event, body, "Normal", verb, message)
            await asyncio.to_thread(self.reconciler.reconcile, owner.namespace, owner.name)


def artifact_file(artifact: Any) -> str | None:
    """The artifact's file name in the shared folder, what the status names: a server's /load
    gives the artifact's key (a client-facing answer names no file), older servers the name."""
    if not isinstance(artifact, str) or not artifact:
        return None
    return artifact if artifact.endswith(".bin") else f"zimage-compile-{artifact}.bin"
