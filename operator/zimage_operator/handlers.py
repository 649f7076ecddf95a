"""Kopf handlers. Each ZImageService is reconciled, level-triggered, from two places:

- a watch event of the service or of one of its children: at once;
- its Kopf daemon, one per service for as long as it exists: a resync every ``resync_seconds``
  (the safety net for drift that raised no event, and where a failed reconcile is retried,
  through ``kopf.TemporaryError`` with backoff), and in ``builtin`` autoscaling mode an
  autoscaler pass every ``autoscale_seconds``, which reconciles when it changes the replicas.

Kopf would put a finalizer on every service that has a daemon, so that it can stop the daemon
before the service goes. A finalizer only the operator can remove makes a service outlive the
operator: ``helm uninstall`` of a release holding one never finishes, and a namespace deleted
while the operator is away stays Terminating. The daemon needs no such guarantee (everything
it looks after is owned, and garbage collection removes it), so the operator opts out: the
daemon ends itself when it finds its service gone. Events go out through Kopf's event helpers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import kopf
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from .autoscaler import Autoscaler
from .builders import GROUP, KIND, PLURAL, VERSION
from .config import FIELD_MANAGER, OperatorSettings
from .kube import OUTAGE, Kube, api_message
from .metrics import SERVICE_LOOPS, start_health_server
from .permissions import REPORT, missing_permissions
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
    ("networking.k8s.io", "v1", "networkpolicies"),
]
# KEDA's kinds (ScaledObject, HTTPScaledObject) are not watched: a watch on a kind whose CRD is
# later deleted (KEDA uninstalled) fails inside Kopf with a 404 that stops the whole operator.
# A change to one is put back by the next resync (resync_seconds) instead.
MAX_BACKOFF_SECONDS = 60.0
BASE_BACKOFF_SECONDS = 2.0
# While the API server is unreachable: retried this often, so that a service is reconciled
# within seconds of its return.
OUTAGE_RETRY_SECONDS = 2.0
WORKER_THREADS = 16


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
    settings.execution.max_workers = WORKER_THREADS
    # The daemons' blocking calls (asyncio.to_thread, which carries the context Kopf's event
    # helpers need) run on the loop's default executor: as many threads as Kopf's own, not
    # asyncio's default of a few per core.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="zimage-operator")
    )
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # Kopf's own API calls (watches, events, finalizers) retry without end while the API server
    # is down, instead of escalating and stopping the operator.
    settings.networking.error_backoffs = _Backoffs()
    settings.posting.default_backoffs = (1.0,)  # events are best effort: one retry, then a warning
    operator_settings: OperatorSettings = memo.settings
    kube = Kube(api_client())
    memo.reconciler = Reconciler(kube, operator_settings, post_event)
    memo.loops = {}
    memo.pods_pending = set()
    memo.autoscaler = Autoscaler(kube, memo.reconciler, operator_settings, post_event)
    memo.health = await start_health_server(operator_settings.health_host, operator_settings.health_port)
    if operator_settings.namespaces:
        # The namespaces are named exactly: nothing to discover, and a namespaced account may not
        # list namespaces (Kopf would retry that refusal forever).
        settings.scanning.disabled = True
    memo.permissions = asyncio.create_task(check_permissions(kube, operator_settings))


async def check_permissions(kube: Kube, settings: OperatorSettings) -> None:
    """Compare the account's permissions with what the operator needs, now and every
    ``permission_check_seconds`` (a grant or a revocation shows without a restart)."""
    while True:
        try:
            missing = await asyncio.to_thread(missing_permissions, kube.api_client, settings.namespaces)
        except Exception as exc:
            if not OUTAGE.record(exc):
                logger.warning("cannot check the operator's permissions: %s: %s", type(exc).__name__, exc)
        else:
            REPORT.update(missing)
        await asyncio.sleep(settings.permission_check_seconds)


class _Backoffs:
    """1, 1, 2, 3, then every ``OUTAGE_RETRY_SECONDS``, forever (an iterable without a length)."""

    def __iter__(self) -> Iterator[float]:
        yield from (1.0, 1.0, 2.0, 3.0)
        while True:
            yield OUTAGE_RETRY_SECONDS


async def stop(memo: kopf.Memo, **_: Any) -> None:
    checker = getattr(memo, "permissions", None)
    if checker is not None:
        checker.cancel()
    health = getattr(memo, "health", None)
    if health is not None:
        await health.cleanup()


def _reconcile_now(memo: kopf.Memo, namespace: str, name: str) -> None:
    """Reconcile on an event. A failure is already in the status and the log; the service's
    daemon retries it with backoff."""
    try:
        memo.reconciler.reconcile(namespace, name)
    except TemporaryFailureError as exc:
        OUTAGE.record(exc.__cause__ or exc)
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


# The labels of a service's server pods (builders.common_labels), which name the service.
SERVER_POD = {"app.kubernetes.io/managed-by": "zimage-operator", "app.kubernetes.io/component": "inference"}
INSTANCE_LABEL = "app.kubernetes.io/instance"
# Pod events of one service within this long make one reconcile: a rollout or a crash loop
# sends several in a burst.
POD_SETTLE_SECONDS = 0.5


async def pod_changed(
    labels: kopf.Labels, namespace: str | None, memo: kopf.Memo, **_: Any
) -> None:  # fmt: skip
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
    await asyncio.to_thread(_reconcile_now, memo, namespace, name)


@dataclass
class ServiceLoopState:
    """What one service's daemon keeps across Kopf's restarts of it (after a failed resync)."""

    history: History = field(default_factory=History)
    failures: int = 0  # failed resyncs in a row, for the backoff
    problem: str | None = None  # the one last logged


def retry_later(exc: TemporaryFailureError, failures: int) -> kopf.TemporaryError:
    """What Kopf is asked to do after a failed reconcile: try again every few seconds while the
    API server is unreachable, else after a backoff that grows with ``failures``."""
    cause = exc.__cause__ or exc
    if OUTAGE.record(cause):
        return kopf.TemporaryError(str(exc), delay=OUTAGE_RETRY_SECONDS)
    return kopf.TemporaryError(str(exc), delay=backoff_seconds(failures))


def describe(exc: BaseException) -> str:
    """One line for the log: the API server's message for a refused request, not its headers."""
    if isinstance(exc, ApiException):
        return f"{exc.status} {api_message(exc)}"
    return f"{type(exc).__name__}: {exc}"


def autoscaling_mode(body: kopf.Body) -> str:
    return str((body.get("spec", {}).get("autoscaling") or {}).get("mode", "builtin"))


def artifacts_enabled(body: kopf.Body) -> bool:
    runtime = body.get("spec", {}).get("runtime") or {}
    return bool((runtime.get("compileArtifacts") or {}).get("enabled"))


def reads_pods(body: kopf.Body) -> bool:
    """Whether the daemon reads the pods' /load: to scale (builtin mode), or for the status of
    the shared compile artifacts or of the LoRA adapters."""
    return (
        autoscaling_mode(body) == "builtin"
        or artifacts_enabled(body)
        or bool(body.get("spec", {}).get("loras"))
    )


async def service_loop(
    *, name: str, namespace: str | None, uid: str | None, body: kopf.Body, memo: Any,
    stopped: kopf.DaemonStopped, **_: Any,
) -> None:  # fmt: skip
    """One service's daemon: a resync now and every ``resync_seconds``, and in builtin mode (or
    with shared compile artifacts or adapters, whose status it reads from the pods) a pass every
    ``autoscale_seconds``. A failed resync raises ``kopf.TemporaryError``,
    and Kopf starts the daemon again after its delay. Ends when the service is gone (``body``,
    which Kopf keeps fresh, only tells the mode; a deletion is learned from the API server)."""
    operator_settings: OperatorSettings = memo.settings
    reconciler: Reconciler = memo.reconciler
    autoscaler: Autoscaler = memo.autoscaler
    loops: dict[str, ServiceLoopState] = memo.loops
    key, namespace = uid or "", namespace or ""
    state = loops.setdefault(key, ServiceLoopState())
    SERVICE_LOOPS.set(len(loops))
    loop = asyncio.get_running_loop()

    def gone() -> None:
        loops.pop(key, None)
        SERVICE_LOOPS.set(len(loops))
        logger.info("%s/%s is gone; its daemon ends", namespace, name)

    async def alive() -> bool:
        found = await asyncio.to_thread(reconciler.kube.get_service, namespace, name)
        return found is not None and found["metadata"].get("uid") == uid

    async def resync() -> bool:
        try:
            if not await alive():
                return False
            await asyncio.to_thread(reconciler.reconcile, namespace, name)
        except TemporaryFailureError as exc:
            state.failures += 1
            raise retry_later(exc, state.failures - 1) from exc
        except Exception as exc:  # the check for the service itself failed
            if OUTAGE.record(exc):
                raise kopf.TemporaryError(str(exc), delay=OUTAGE_RETRY_SECONDS) from exc
            state.failures += 1
            problem = describe(exc)
            if problem != state.problem:  # once per distinct problem, never a traceback
                logger.warning("cannot read %s/%s: %s", namespace, name, problem)
            state.problem = problem
            raise kopf.TemporaryError(problem, delay=backoff_seconds(state.failures - 1)) from exc
        state.failures, state.problem = 0, None
        OUTAGE.succeeded()
        return True

    if not await resync():
        gone()
        return
    next_resync = loop.time() + operator_settings.resync_seconds
    last_problem = None
    async with httpx.AsyncClient(timeout=operator_settings.load_timeout_seconds) as http:
        while not stopped:
            await stopped.wait(operator_settings.autoscale_seconds)
            if stopped:
                return
            if loop.time() >= next_resync or reconciler.rollout_due(namespace, name):
                if not await resync():
                    break
                next_resync = loop.time() + operator_settings.resync_seconds
            if not reads_pods(body):
                continue
            try:
                if not await autoscaler.scale_if_present(http, namespace, name, key, state.history):
                    break
            except Exception as exc:
                if OUTAGE.record(exc):
                    continue
                problem = describe(exc)
                if problem != last_problem:  # once per distinct problem
                    logger.warning("autoscaler pass on %s/%s failed: %s", namespace, name, problem)
                last_problem = problem
            else:
                last_problem = None
    gone()


def without_finalizers(registry: kopf.OperatorRegistry) -> None:
    """Registers the daemons as needing no finalizer (the module docstring says why). Kopf's
    decorators have no argument for it, so the registered handlers are replaced."""
    spawning = registry._spawning
    spawning._handlers = [
        dataclasses.replace(handler, requires_finalizer=False) for handler in spawning.get_all_handlers()
    ]


def register(settings: OperatorSettings, registry: kopf.OperatorRegistry | None = None) -> None:
    """Register every handler with Kopf (in ``registry``, by default Kopf's own); the intervals
    come from ``settings``."""
    registry = registry or kopf.get_default_registry()
    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(stop)
    kopf.on.event(GROUP, VERSION, PLURAL, id="service", registry=registry)(service_changed)
    for group, version, plural in CHILDREN:
        kopf.on.event(group, version, plural, labels=MANAGED, id=f"child-{plural}", registry=registry)(
            child_changed
        )
    kopf.on.event("", "v1", "pods", labels=SERVER_POD, id="pods", registry=registry)(pod_changed)
    kopf.daemon(GROUP, VERSION, PLURAL, id="loop", cancellation_timeout=10.0, registry=registry)(service_loop)
    without_finalizers(registry)
