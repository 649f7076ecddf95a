"""Kopf handlers: every event of a ZImageService or of one of its children, and a periodic
resync, lead to the same level-triggered reconcile of the ZImageService."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

import kopf
from kubernetes import client, config

from .autoscaler import Autoscaler
from .builders import GROUP, KIND, PLURAL, VERSION
from .config import OperatorSettings
from .kube import OUTAGE, Kube, unreachable
from .reconcile import Reconciler, TemporaryFailureError

logger = logging.getLogger(__name__)

MANAGED = {"app.kubernetes.io/managed-by": "zimage-operator"}
CHILDREN = [
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("batch", "v1", "jobs"),
    ("", "v1", "persistentvolumeclaims"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
]
# Watched only where KEDA is installed; Kopf skips resources the cluster does not serve.
OPTIONAL_CHILDREN = [("keda.sh", "v1alpha1", "scaledobjects")]
MAX_BACKOFF_SECONDS = 60.0
OUTAGE_RETRY_SECONDS = 4.0


def api_client() -> client.ApiClient:
    """In a pod: its service account. Elsewhere: the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    # One connection per handler thread, so concurrent reconciles do not queue for a socket.
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


class Runner:
    """Calls the reconciler, retrying temporary failures with exponential backoff."""

    def __init__(self, reconciler: Reconciler, base_delay: float = 2.0) -> None:
        self.reconciler = reconciler
        self.base_delay = base_delay
        self._attempts: dict[str, int] = {}
        self._guard = threading.Lock()

    def run(self, namespace: str, name: str) -> None:
        key = f"{namespace}/{name}"
        try:
            self.reconciler.reconcile(namespace, name)
        except TemporaryFailureError as exc:
            with self._guard:
                attempt = self._attempts.get(key, 0) + 1
                self._attempts[key] = attempt
            delay = min(MAX_BACKOFF_SECONDS, self.base_delay * 2.0 ** (attempt - 1))
            if unreachable(exc.__cause__ or exc):
                OUTAGE.failed(exc.__cause__ or exc)
                # Short, so the service is reconciled within seconds of the API server's return.
                delay = min(delay, OUTAGE_RETRY_SECONDS)
            elif attempt == 1:  # the reconciler has said what failed; say once that it retries
                logger.info("reconcile of %s will be retried with backoff", key)
            timer = threading.Timer(delay, self.run, args=(namespace, name))
            timer.daemon = True
            timer.start()
        else:
            OUTAGE.succeeded()
            with self._guard:
                self._attempts.pop(key, None)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # The project's own names for Kopf's bookkeeping.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    operator_settings: OperatorSettings = memo.settings
    kube = Kube(api_client())
    # Events go through the API directly: Kopf's event queue is only reachable from its own
    # handlers, and the resync and autoscaler loops post events too.
    reconciler = Reconciler(kube, operator_settings, kube.post_event)
    memo.runner = Runner(reconciler)
    memo.resync = asyncio.create_task(_resync_forever(memo.runner, operator_settings.resync_seconds))
    autoscaler = Autoscaler(kube, reconciler, operator_settings, kube.post_event)
    memo.autoscale = asyncio.create_task(autoscaler.run_forever())


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    for name in ("resync", "autoscale"):
        task: asyncio.Task[None] | None = getattr(memo, name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _resync_forever(runner: Runner, interval: float) -> None:
    """The safety net: drift that raised no event is found within one interval."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval)
        try:
            await loop.run_in_executor(None, runner.reconciler.resync_all)
        except Exception as exc:
            if not unreachable(exc):
                logger.warning("resync failed: %s: %s", type(exc).__name__, exc)
            else:
                OUTAGE.failed(exc)


@kopf.on.event(GROUP, VERSION, PLURAL)
def service_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        return
    memo.runner.run(body.metadata.namespace, body.metadata.name)


def child_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    for ref in body.metadata.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            memo.runner.run(body.metadata.namespace, ref["name"])


for _group, _version, _plural in CHILDREN + OPTIONAL_CHILDREN:
    kopf.on.event(_group, _version, _plural, labels=MANAGED, id=f"child-{_plural}")(child_changed)
