"""Kopf handlers. Each ZImageService is reconciled, level-triggered, from two places:

- a watch event of the service or of one of its children: at once;
- the operator's periodic passes (passes.py): a resync every ``resync_seconds``, the retry of a
  failed reconcile after its backoff, and the built-in autoscaler every ``autoscale_seconds``.

Kopf's indices hold the services, their Deployments and their server pods as the watches last
saw them; the passes read those, not the API server. No handler needs a finalizer, so none is
set. Events go out through the operator's own client (kube.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from .autoscaler import Autoscaler
from .builders import GROUP, KIND, PLURAL, VERSION
from .config import OperatorSettings
from .kopf_settings import tune
from .kube import Kube, api_client
from .metrics import start_health_server
from .passes import Passes
from .permissions import check_permissions
from .reconcile import Reconciler

logger = logging.getLogger(__name__)

MANAGED = {"app.kubernetes.io/managed-by": "zimage-operator"}
CHILDREN = [
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("batch", "v1", "jobs"),
    ("", "v1", "persistentvolumeclaims"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("networking.k8s.io", "v1", "networkpolicies"),
]
# KEDA's kinds (ScaledObject, HTTPScaledObject) are not watched: a watch on a kind whose CRD is
# later deleted (KEDA uninstalled) fails inside Kopf with a 404 that stops the whole operator.
# A change to one is put back by the next resync (resync_seconds) instead.
# The labels of a service's server pods (builders.common_labels), which name the service.
SERVER_POD = {"app.kubernetes.io/managed-by": "zimage-operator", "app.kubernetes.io/component": "inference"}
INSTANCE_LABEL = "app.kubernetes.io/instance"
# Pod events of one service within this long make one reconcile: a rollout or a crash loop
# sends several in a burst.
POD_SETTLE_SECONDS = 0.5


async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **indices: Any) -> None:
    ours: OperatorSettings = memo.settings
    tune(settings, ours)
    kube = Kube(api_client(), memo.outage)
    reconciler = Reconciler(kube, ours, kube.post_event)
    memo.passes = Passes(reconciler, Autoscaler(kube, reconciler, ours, kube.post_event), ours, indices)
    memo.pods_pending = set()
    memo.health = await start_health_server(ours.health_host, ours.health_port)
    memo.tasks = [
        asyncio.create_task(memo.passes.run()),
        asyncio.create_task(check_permissions(kube, ours)),
    ]


async def stop(memo: kopf.Memo, **_: Any) -> None:
    for task in getattr(memo, "tasks", []):
        task.cancel()
    health = getattr(memo, "health", None)
    if health is not None:
        await health.cleanup()


async def service_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        return
    await memo.passes.reconcile(body.metadata.namespace or "", body.metadata.name or "")


async def child_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    for ref in body.metadata.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            await memo.passes.reconcile(body.metadata.namespace or "", ref["name"])


async def pod_changed(labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """A server pod changed (started, crashed, became ready, cannot mount a volume): its
    service's status is brought up to date within a second, not at the next resync."""
    name = labels.get(INSTANCE_LABEL)
    if not name or not namespace:
        return
    key = f"{namespace}/{name}"
    pending: set[str] = memo.pods_pending
    if key in pending:
        return  # a reconcile is already on its way and will see this pod as it is then
    pending.add(key)
    try:
        await asyncio.sleep(POD_SETTLE_SECONDS)
    finally:
        pending.discard(key)
    await memo.passes.reconcile(namespace, name)


def by_name(namespace: str | None, name: str | None, body: kopf.Body, **_: Any) -> Any:
    """An index of the services, and of their Deployments: each by (namespace, name)."""
    return {(namespace, name): dict(body)}


def index_server_pod(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> Any:
    return {(namespace, labels.get(INSTANCE_LABEL)): dict(body)}


def register(settings: OperatorSettings, registry: kopf.OperatorRegistry | None = None) -> None:
    """Register every handler with Kopf (in ``registry``, by default Kopf's own)."""
    registry = registry or kopf.get_default_registry()
    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(stop)
    kopf.index(GROUP, VERSION, PLURAL, id="index_service", registry=registry)(by_name)
    kopf.index("apps", "v1", "deployments", labels=MANAGED, id="index_deployment", registry=registry)(by_name)
    kopf.index("", "v1", "pods", labels=SERVER_POD, id="index_server_pod", registry=registry)(
        index_server_pod
    )
    kopf.on.event(GROUP, VERSION, PLURAL, id="service", registry=registry)(service_changed)
    for group, version, plural in CHILDREN:
        kopf.on.event(group, version, plural, labels=MANAGED, id=f"child-{plural}", registry=registry)(
            child_changed
        )
    kopf.on.event("", "v1", "pods", labels=SERVER_POD, id="pods", registry=registry)(pod_changed)
