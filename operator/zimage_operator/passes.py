"""The operator's periodic work over every ZImageService, and where a failed reconcile waits.

One task for the whole operator (started with Kopf, stopped with it) wakes every
``autoscale_seconds`` and walks the services Kopf's index holds:

- a resync: every ``resync_seconds`` while the service is not settled (not Ready, Degraded, or
  its newest spec not yet reconciled), every ``idle_resync_seconds`` once it is (its children
  and pods are watched, so drift shows at once; the resync catches what no watch sees, such as
  KEDA's objects); and the retry of a failed reconcile after its backoff (2, 4, ... 60 s; every
  2 s while the API server is unreachable);
- in ``builtin`` autoscaling mode, or with shared compile artifacts or LoRA adapters (whose
  status comes from the pods), an autoscaler pass, from what the watches hold: an idle service
  costs the API server no request between resyncs.

What it keeps per service lives in ``ServiceState`` and goes when the service leaves the index
(deleted): no finalizer is needed to learn of a deletion, so none is set, and a service never
outlives the operator (``helm uninstall`` and a deleted namespace finish without it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import kopf

from .autoscaler import Autoscaler
from .config import OperatorSettings
from .failures import OUTAGE_RETRY_SECONDS, backoff_seconds, describe
from .metrics import SERVICE_LOOPS
from .reconcile import Reconciler, TemporaryFailureError
from .scaling import History

logger = logging.getLogger(__name__)

Key = tuple[str, str]  # namespace, name


def settled(body: Mapping[str, Any]) -> bool:
    """Ready, not Degraded, and its newest spec reconciled: nothing to wait for."""
    status = body.get("status") or {}
    conditions = {item.get("type"): item.get("status") for item in status.get("conditions") or []}
    current = status.get("observedGeneration") == (body.get("metadata") or {}).get("generation")
    return current and conditions.get("Ready") == "True" and conditions.get("Degraded") != "True"


def reads_pods(body: Mapping[str, Any]) -> bool:
    """Whether the passes read the pods' /load: to scale (builtin mode), or for the status of
    the shared compile artifacts or of the LoRA adapters."""
    spec = body.get("spec") or {}
    runtime = spec.get("runtime") or {}
    return (
        str((spec.get("autoscaling") or {}).get("mode", "builtin")) == "builtin"
        or bool((runtime.get("compileArtifacts") or {}).get("enabled"))
        or bool(spec.get("loras"))
    )


@dataclass
class ServiceState:
    """What the operator keeps for one service (by uid) while it exists."""

    key: Key
    last_reconcile: float  # loop time of the last successful one
    retry_at: float | None = None  # after a failed one
    history: History = field(default_factory=History)
    failures: int = 0  # failed reconciles in a row, for the backoff
    problem: str | None = None  # the autoscaler problem last logged
    busy: asyncio.Task[None] | None = None


def entries(index: kopf.Index[Any, Any], key: Key) -> list[dict[str, Any]]:
    return list(index[key]) if key in index else []


class Passes:
    def __init__(
        self,
        reconciler: Reconciler,
        autoscaler: Autoscaler,
        settings: OperatorSettings,
        indices: Mapping[str, kopf.Index[Any, Any]],
    ) -> None:
        self.reconciler = reconciler
        self.autoscaler = autoscaler
        self.settings = settings
        # Kopf's indices (handlers.py), by their handlers' names.
        self.services = indices["index_service"]
        self.deployments = indices["index_deployment"]
        self.pods = indices["index_server_pod"]
        self.states: dict[str, ServiceState] = {}  # by uid
        self.outage = reconciler.kube.outage

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self.settings.load_timeout_seconds) as http:
            while True:
                self.tick(http)
                await asyncio.sleep(self.settings.autoscale_seconds)

    def tick(self, http: httpx.AsyncClient) -> None:
        """Start the work due for each service whose last is done; forget the services gone."""
        present: dict[str, tuple[Key, dict[str, Any]]] = {}
        for key in list(self.services):
            for body in entries(self.services, key):
                present[body["metadata"]["uid"]] = (key, body)
        for uid in set(self.states) - set(present):
            state = self.states.pop(uid)
            if state.busy is not None:
                state.busy.cancel()
            self.reconciler.forget(*state.key)
            logger.info("%s/%s is gone; what the operator kept for it is dropped", *state.key)
        for uid, (key, body) in present.items():
            if body["metadata"].get("deletionTimestamp"):
                continue  # going: garbage collection removes the children
            # A new service was reconciled on its event: its first resync is a period away.
            found = self.states.get(uid) or self.state_of(key)
            if found is None:
                continue
            state = found
            if state.busy is None or state.busy.done():
                state.busy = asyncio.create_task(self.work(http, key, body, state))
        SERVICE_LOOPS.set(len(self.states))

    async def work(
        self, http: httpx.AsyncClient, key: Key, body: dict[str, Any], state: ServiceState
    ) -> None:
        namespace, name = key
        now = asyncio.get_running_loop().time()
        period = self.settings.idle_resync_seconds if settled(body) else self.settings.resync_seconds
        due = now >= state.retry_at if state.retry_at is not None else now >= state.last_reconcile + period
        resync = due or self.reconciler.rollout_due(namespace, name)
        if resync and not await self.reconcile(namespace, name, state):
            return
        if not reads_pods(body):
            return
        deployment = next(iter(entries(self.deployments, key)), None)
        try:
            await self.autoscaler.scale(http, body, deployment, entries(self.pods, key), state.history)
        except Exception as exc:
            if self.outage.record(exc):
                return
            problem = describe(exc)
            if problem != state.problem:  # once per distinct problem, never a traceback
                logger.warning("autoscaler pass on %s/%s failed: %s", namespace, name, problem)
            state.problem = problem
        else:
            state.problem = None

    async def reconcile(self, namespace: str, name: str, state: ServiceState | None = None) -> bool:
        """Reconcile now; a failure sets when it is tried again. Whether it succeeded. The
        reconciler has logged and reported what failed."""
        state = state or self.state_of((namespace, name))
        loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self.reconciler.reconcile, namespace, name)
        except TemporaryFailureError as exc:
            if state is not None:
                outage = self.outage.record(exc.__cause__ or exc)
                delay = OUTAGE_RETRY_SECONDS if outage else backoff_seconds(state.failures)
                state.failures += 1
                state.retry_at = loop.time() + delay
            return False
        self.outage.succeeded()
        if state is not None:
            state.failures = 0
            state.retry_at, state.last_reconcile = None, loop.time()
        return True

    def state_of(self, key: Key) -> ServiceState | None:
        """The state of the service at ``key``, made now if it is new (a failure of its first
        reconcile then has its backoff); None when it is not in the index (gone)."""
        for body in entries(self.services, key):
            now = asyncio.get_running_loop().time()
            new = ServiceState(key, last_reconcile=now)
            return self.states.setdefault(body["metadata"]["uid"], new)
        return None
