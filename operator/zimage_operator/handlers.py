"""Kopf handlers. Each ZImageService is reconciled, level-triggered, from three places:

- a watch event of the service or of one of its children: at once;
- its resync timer: every ``resync_seconds``, the safety net for drift that raised no event,
  and the place where a failed reconcile is retried (``kopf.TemporaryError`` with backoff);
- in ``builtin`` autoscaling mode, its autoscaler daemon, which reads the pods' load every
  ``autoscale_seconds`` and reconciles when it changes the replica count.

The timer and the daemon are per service, so Kopf starts them when a service appears and stops
them before it is gone (which is why Kopf puts its finalizer on each service). Events go out
through Kopf's event helpers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import kopf
from kubernetes import client, config

from .autoscaler import Autoscaler
from .builders import GROUP, KIND, PLURAL, VERSION
from .config import FIELD_MANAGER, OperatorSettings
from .kube import OUTAGE, Kube
from .metrics import start_health_server
from .reconcile import Reconciler, TemporaryFailureError
from .scaling import History

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
BASE_BACKOFF_SECONDS = 2.0
# While the API server is unreachable: retried this often, so that a service is reconciled
# within seconds of its return.
OUTAGE_RETRY_SECONDS = 2.0


def backoff_seconds(retry: int) -> float:
    """Delay before retry number ``retry + 1`` of a failed reconcile: 2, 4, 8, ... 60 seconds."""
    return min(MAX_BACKOFF_SECONDS, BASE_BACKOFF_SECONDS * 2.0**retry)


def api_client() -> client.ApiClient:
    """In a pod: its service account. Elsewhere: the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    # One connection per handler thread, so concurrent reconciles do not queue for a socket.
    configuration.connection_pool_maxsize = 32
    # Fail fast while the API server is down; the caller retries with backoff.
    configuration.retries = 0
    return client.ApiClient(configuration)


def post_event(body: dict[str, Any], kind: str, reason: str, message: str) -> None:
    kopf.event(body, type=kind, reason=reason, message=message[:1024])  # type: ignore[arg-type]


async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # The project's own names for Kopf's bookkeeping.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # Kopf's own messages; ours go through post_event
    settings.posting.reporting_component = FIELD_MANAGER
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # Kopf's own API calls (watches, events, finalizers) retry without end while the API server
    # is down, instead of escalating and stopping the operator.
    settings.networking.error_backoffs = _Backoffs()
    settings.posting.default_backoffs = (1.0,)  # events are best effort: one retry, then a warning
    operator_settings: OperatorSettings = memo.settings
    kube = Kube(api_client())
    memo.reconciler = Reconciler(kube, operator_settings, post_event)
    memo.autoscaler = Autoscaler(kube, memo.reconciler, operator_settings, post_event)
    memo.health = await start_health_server(operator_settings.health_host, operator_settings.health_port)


class _Backoffs:
    """1, 1, 2, 3, then every ``OUTAGE_RETRY_SECONDS``, forever (an iterable without a length)."""

    def __iter__(self) -> Iterator[float]:
        yield from (1.0, 1.0, 2.0, 3.0)
        while True:
            yield OUTAGE_RETRY_SECONDS


async def stop(memo: kopf.Memo, **_: Any) -> None:
    health = getattr(memo, "health", None)
    if health is not None:
        await health.cleanup()


def _reconcile_now(memo: kopf.Memo, namespace: str, name: str) -> None:
    """Reconcile on an event. A failure is already in the status and the log; the service's
    timer retries it with backoff."""
    try:
        memo.reconciler.reconcile(namespace, name)
    except TemporaryFailureError as exc:
        if OUTAGE.covers(exc.__cause__ or exc):
            OUTAGE.failed(exc.__cause__ or exc)
    else:
        OUTAGE.succeeded()


def service_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED" or body.metadata.get("deletionTimestamp"):
        return
    _reconcile_now(memo, body.metadata.namespace or "", body.metadata.name or "")


def child_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    for ref in body.metadata.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            _reconcile_now(memo, body.metadata.namespace or "", ref["name"])


def resync(*, name: str, namespace: str | None, memo: Any, **kwargs: Any) -> None:
    retry = int(kwargs.get("retry", 0))  # Kopf's count of failed attempts in a row
    try:
        memo.reconciler.reconcile(namespace or "", name)
    except TemporaryFailureError as exc:
        cause = exc.__cause__ or exc
        if OUTAGE.covers(cause):
            OUTAGE.failed(cause)
            raise kopf.TemporaryError(str(exc), delay=OUTAGE_RETRY_SECONDS) from exc
        raise kopf.TemporaryError(str(exc), delay=backoff_seconds(retry)) from exc
    OUTAGE.succeeded()


def builtin_mode(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("autoscaling") or {}).get("mode", "builtin") == "builtin")


async def autoscale(
    *, name: str, namespace: str | None, memo: Any, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    """The service's autoscaler: a pass every ``autoscale_seconds`` until Kopf stops it."""
    operator_settings: OperatorSettings = memo.settings
    autoscaler: Autoscaler = memo.autoscaler
    history = History()
    last_problem = None
    async with httpx.AsyncClient(timeout=operator_settings.load_timeout_seconds) as http:
        while not stopped:
            await stopped.wait(operator_settings.autoscale_seconds)
            if stopped:
                break
            try:
                await autoscaler.scale(http, namespace or "", name, history)
            except Exception as exc:
                if OUTAGE.covers(exc):
                    OUTAGE.failed(exc)
                    continue
                problem = f"{type(exc).__name__}: {exc}"
                if problem != last_problem:  # once per distinct problem
                    logger.warning("autoscaler pass on %s/%s failed: %s", namespace, name, problem)
                last_problem = problem
            else:
                last_problem = None


def register(settings: OperatorSettings) -> None:
    """Register every handler with Kopf; the intervals come from ``settings``."""
    kopf.on.startup()(configure)
    kopf.on.cleanup()(stop)
    kopf.on.event(GROUP, VERSION, PLURAL, id="service")(service_changed)
    for group, version, plural in CHILDREN + OPTIONAL_CHILDREN:
        kopf.on.event(group, version, plural, labels=MANAGED, id=f"child-{plural}")(child_changed)
    kopf.timer(GROUP, VERSION, PLURAL, id="resync", interval=settings.resync_seconds)(resync)
    kopf.daemon(GROUP, VERSION, PLURAL, id="autoscaler", when=builtin_mode, cancellation_timeout=10.0)(
        autoscale
    )
