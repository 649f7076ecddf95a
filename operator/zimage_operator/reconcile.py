"""Level-triggered reconciliation of one ZImageService.

Each pass reads the resource and its children as they are now, builds the desired children,
applies only those that differ from what is live (a child deleted or edited by hand is put
back), deletes children no longer wanted, and writes the status only when it changed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException

from . import builders
from .builders import Manifest, Owner
from .coalesce import MAX_HOLD_SECONDS, QUIET_SECONDS, ChangeCoalescer
from .config import FIELD_MANAGER, OperatorSettings
from .drift import contains, foreign_changes
from .failures import api_message, is_temporary, namespace_terminating
from .kube import Kube
from .metrics import ERRORS, RECONCILES
from .spec import InvalidSpecError, ZImageServiceSpec, parse_spec
from .status import (
    VRAM_WORDS,
    Condition,
    ModelState,
    compute_conditions,
    merge_conditions,
    model_state,
    now_rfc3339,
    scaling_condition,
    transitions,
)

logger = logging.getLogger(__name__)

# (type, reason, message): posted as a Kubernetes Event on the ZImageService.
EventSink = Callable[[dict[str, Any], str, str, str], None]
MANAGED_SELECTOR = "app.kubernetes.io/managed-by=zimage-operator"


# Children compared field for field with their rendering as the API server stores it.
DEFAULTED_KINDS = frozenset({"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"})
# Children deleted and created again when an edit leaves them unable to take the rendering.
RECREATED_KINDS = frozenset({"PodDisruptionBudget", "NetworkPolicy"})
MAX_DEFAULTS = 1024


class TemporaryFailureError(RuntimeError):
    """The API server could not take a write just now; try again after a pause."""


@dataclass
class Reconciler:
    kube: Kube
    settings: OperatorSettings
    post_event: EventSink
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _failures: dict[str, str] = field(default_factory=dict)  # namespace/name -> the problem last logged
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _defaults: dict[str, dict[str, Any] | None] = field(default_factory=dict)  # rendering -> defaulted
    _changes: ChangeCoalescer = field(default_factory=ChangeCoalescer)

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def reconcile(self, namespace: str, name: str) -> None:
        """Bring one ZImageService and its children to the desired state. Serialized per object.

        Whatever goes wrong ends as a Degraded condition and one log line per distinct problem;
        an unreachable API server or a failure worth retrying raises ``TemporaryFailureError``."""
        key = f"{namespace}/{name}"
        with self._lock(key):
            try:
                body = self.kube.get_service(namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    self._forget(key)
                    return  # gone, or going: garbage collection removes the children
                clean = self._reconcile(body)
            except TemporaryFailureError:
                RECONCILES.labels("retry").inc()
                raise
            except Exception as exc:
                if self.kube.outage.covers(exc):
                    RECONCILES.labels("retry").inc()
                    raise TemporaryFailureError(f"the API server is unreachable: {exc}") from exc
                ERRORS.labels("api" if isinstance(exc, ApiException) else "internal").inc()
                try:
                    self._report_failure(namespace, name, exc)
                except Exception as report:
                    if self.kube.outage.covers(report):  # the API server went away meanwhile
                        RECONCILES.labels("retry").inc()
                        raise TemporaryFailureError(f"the API server is unreachable: {report}") from report
                    self._log_once(namespace, name, f"cannot report a failure in the status: {report}")
                if isinstance(exc, ApiException) and is_temporary(exc):
                    RECONCILES.labels("retry").inc()
                    raise TemporaryFailureError(api_message(exc)) from exc
                RECONCILES.labels("degraded").inc()
            else:
                RECONCILES.labels("ok" if clean else "degraded").inc()

    def forget(self, namespace: str, name: str) -> None:
        """Drop what is kept for a service that is gone."""
        with self._lock(f"{namespace}/{name}"):
            self._forget(f"{namespace}/{name}")

    def _forget(self, key: str) -> None:
        """Drop what this operator keeps for a service that is gone: its held rollout, its last
        logged problem and its lock (released by the caller; a later reconcile of a service of
        the same name makes a new one)."""
        self._changes.forget(key)
        self._failures.pop(key, None)
        with self._guard:
            self._locks.pop(key, None)

    def _report_failure(self, namespace: str, name: str, exc: Exception) -> None:
        """Degraded=True, reason ReconcileFailed, with what went wrong; the other conditions
        stay as they were, since nothing new is known of them."""
        message = api_message(exc) if isinstance(exc, ApiException) else f"{type(exc).__name__}: {exc}"
        body = self.kube.get_service(namespace, name)
        if body is None:
            return
        meta = body["metadata"]
        if self._log_once(namespace, name, f"reconcile failed: {message}"):
            logger.debug("reconcile of %s/%s failed", namespace, name, exc_info=exc)
        previous = (body.get("status") or {}).get("conditions") or []
        kept = [item for item in previous if item.get("type") != "Degraded"]
        degraded = Condition("Degraded", True, "ReconcileFailed", message[:1024])
        generation = int(meta.get("generation") or 1)
        merged = merge_conditions(previous, [degraded], generation, now_rfc3339())
        self.kube.patch_status(namespace, name, {"conditions": [*kept, *merged]})

    def _log_once(self, namespace: str, name: str, message: str) -> bool:
        """Log ``message`` unless it is the one last logged for this service."""
        key = f"{namespace}/{name}"
        if self._failures.get(key) == message:
            return False
        self._failures[key] = message
        logger.warning("%s: %s", key, message)
        return True

    def _reconcile(self, body: dict[str, Any]) -> bool:
        """One pass; False when the spec or a write was refused (and said so in the status)."""
        meta = body["metadata"]
        owner = Owner(meta["name"], meta["namespace"], meta["uid"])
        generation = int(meta.get("generation") or 1)
        try:
            spec = parse_spec(body.get("spec"))
        except InvalidSpecError as exc:
            self._write_status(body, owner, generation, invalid=str(exc))
            return False
        problem = builders.name_problem(owner.name)
        if problem is not None:
            self._write_status(body, owner, generation, invalid=problem)
            return False

        job_name = builders.prefetch_job_name(owner, spec)
        job = self.kube.get("batch/v1", "Job", owner.namespace, job_name) if spec.needs_cache else None
        job_pods = (
            self.kube.list_objects("v1", "Pod", owner.namespace, f"batch.kubernetes.io/job-name={job_name}")
            if job is not None
            else []
        )
        model = model_state(spec.needs_cache, job, job_pods)
        live_deployment = self.kube.get("apps/v1", "Deployment", owner.namespace, owner.name)
        if live_deployment is not None and not owns(live_deployment, owner):
            foreign_deployment, live_deployment = live_deployment, None
        else:
            foreign_deployment = None
        current = None if live_deployment is None else (live_deployment.get("spec") or {}).get("replicas")
        if spec.autoscaling.mode == "builtin":
            scaled = ((body.get("status") or {}).get("autoscaling") or {}).get("desiredReplicas")
            current = scaled if scaled is not None else current
        replicas = builders.desired_replicas(spec, current, model.ready)
        refreshing = _refreshing(model, live_deployment)
        if refreshing is not None:  # the running replicas keep serving until the cache is filled
            replicas = int((live_deployment or {}).get("spec", {}).get("replicas") or 0)

        desired: list[Manifest] = []
        claim = builders.build_cache_claim(owner, spec)
        if claim is not None:
            desired.append(claim)
        prefetch = builders.build_prefetch_job(owner, spec, self.settings)
        if prefetch is not None:
            desired.append(prefetch)
        # Under an HPA the replica count is the HPA's, once the Deployment exists.
        hpa = spec.autoscaling.mode == "hpa"
        external = spec.autoscaling.mode in ("hpa", "keda")  # the replica count is theirs
        deployment_replicas = None if external and live_deployment is not None and model.ready else replicas
        desired.append(builders.build_deployment(owner, spec, self.settings, deployment_replicas))
        if hpa:
            desired.append(builders.build_hpa(owner, spec))
        keda_missing: tuple[str, str] | None = None
        if spec.scales_from_zero:
            if self._crd_installed(builders.HTTP_ADDON_CRD):
                desired.append(builders.build_http_scaled_object(owner, spec))
            else:
                keda_missing = (
                    "KedaHttpAddOnNotInstalled",
                    "autoscaling.minReplicas 0 (scale from zero) needs KEDA's HTTP add-on, but its CRD "
                    f"{builders.HTTP_ADDON_CRD} is not installed; install KEDA and its HTTP add-on, or "
                    "set minReplicas 1",
                )
        elif spec.autoscaling.mode == "keda":
            if self._crd_installed(builders.KEDA_CRD):
                desired.append(builders.build_scaled_object(owner, spec, self.settings))
            else:
                keda_missing = (
                    "KedaNotInstalled",
                    f"autoscaling.mode keda needs KEDA, but its CRD {builders.KEDA_CRD} is not installed; "
                    "install KEDA or choose another mode",
                )
        desired.append(builders.build_service(owner, spec))
        desired.append(builders.build_pdb(owner, spec))
        if spec.network_policy.enabled:
            desired.append(builders.build_network_policy(owner))

        lives = [
            foreign_deployment or live_deployment
            if manifest["kind"] == "Deployment"
            else self.kube.get(
                manifest["apiVersion"], manifest["kind"], owner.namespace, manifest["metadata"]["name"]
            )
            for manifest in desired
        ]
        conflicts = [
            f"{manifest['kind']} {owner.namespace}/{manifest['metadata']['name']}"
            for manifest, live in zip(desired, lives, strict=True)
            if live is not None and not owns(live, owner)
        ]
        if conflicts:
            # Someone else's objects carry the names this service's children need: nothing is
            # written, adopted or deleted until they are gone or the service is renamed.
            message = (
                f"{', '.join(conflicts)} already exist{'s' if len(conflicts) == 1 else ''} and "
                f"{'was' if len(conflicts) == 1 else 'were'} not created by this ZImageService; "
                "it is left alone. Rename the ZImageService, or delete or rename "
                f"{'that object' if len(conflicts) == 1 else 'those objects'}"
            )
            self._log_once(owner.namespace, owner.name, message)
            self._write_status(
                body, owner, generation, spec=spec, replicas=replicas, model=model,
                conflict=message,
            )  # fmt: skip
            return False

        key = f"{owner.namespace}/{owner.name}"
        # A service with pods running rolls them once for changes that arrive together.
        held = self._changes.hold(key, generation) if live_deployment is not None else None
        apply_error = None
        retry = False
        deployment = live_deployment
        for manifest, live in zip(desired, lives, strict=True):
            if (held is not None or refreshing is not None) and manifest["kind"] == "Deployment":
                continue
            try:
                result = self._converge(manifest, live)
            except ApiException as exc:
                if self.kube.outage.covers(exc):
                    raise
                if namespace_terminating(exc):  # it all goes with the namespace: nothing to do
                    logger.debug("%s/%s: its namespace is being deleted", owner.namespace, owner.name)
                    return True
                # Refused (4xx) or failed (5xx) for this child alone: said in the status; a
                # failure worth retrying is retried with backoff once the status is written.
                retry = retry or is_temporary(exc)
                apply_error = f"{manifest['kind']} {manifest['metadata']['name']}: {api_message(exc)}"
                self._log_once(owner.namespace, owner.name, f"cannot apply {apply_error}")
                continue
            if manifest["kind"] == "Deployment" and result is not None:
                deployment = result
        self._prune(owner, spec, job_name)

        pods = self.kube.list_objects("v1", "Pod", owner.namespace, builders.selector_string(owner))
        vram_restart = self._report_vram_restarts(body, pods)
        rollout_held = None
        if held is not None:
            rollout_held = (
                f"spec changes are gathered until {QUIET_SECONDS:g} s pass without one (at most "
                f"{MAX_HOLD_SECONDS:g} s) so that the pods roll once; rolling in {held:.0f} s"
            )
        self._write_status(
            body,
            owner,
            generation,
            spec=spec,
            apply_error=apply_error,
            deployment=deployment,
            replicas=replicas,
            pods=pods,
            model=model,
            blocked=keda_missing,
            vram_restart=vram_restart,
            pod_problems=self._mount_failures(owner.namespace, pods),
            rollout_held=rollout_held,
            refreshing=refreshing,
        )
        if retry:
            raise TemporaryFailureError(apply_error or "a write failed")
        if apply_error is None:
            self._failures.pop(f"{owner.namespace}/{owner.name}", None)
        return apply_error is None and keda_missing is None

    def rollout_due(self, namespace: str, name: str) -> bool:
        """Whether a rollout held for changes arriving together may go ahead now."""
        return self._changes.due(f"{namespace}/{name}")

    def _mount_failures(self, namespace: str, pods: list[dict[str, Any]]) -> list[str]:
        """``pod: FailedMount: the kubelet's message`` for each pod still creating its
        containers because a volume cannot be mounted (a Secret or claim that does not exist):
        the kubelet says so only in Events, and the pod waits without end."""
        creating = {
            pod["metadata"]["name"]
            for pod in pods
            if not pod["metadata"].get("deletionTimestamp")
            and any(
                ((status.get("state") or {}).get("waiting") or {}).get("reason")
                in ("ContainerCreating", "PodInitializing")
                for status in (pod.get("status") or {}).get("containerStatuses") or []
            )
        }
        if not creating:
            return []
        events = self.kube.list_events(namespace, "involvedObject.kind=Pod,reason=FailedMount")
        found: dict[str, str] = {}
        for event in sorted(events, key=lambda item: str(item.get("lastTimestamp") or "")):
            pod = str((event.get("involvedObject") or {}).get("name") or "")
            if pod in creating:
                found[pod] = f"{pod}: FailedMount: {str(event.get('message') or '')[:300]}"
        return sorted(found.values())

    def _crd_installed(self, name: str) -> bool:
        crd = self.kube.get("apiextensions.k8s.io/v1", "CustomResourceDefinition", "", name)
        return crd is not None

    def _converge(self, manifest: Manifest, live: dict[str, Any] | None) -> dict[str, Any] | None:
        """Make the live child hold ``manifest``, writing nothing when it already does: first put
        back what others added where the operator owns whole sections, then apply. ``live`` is
        the child as read in this pass (None: not there), one the service owns."""
        meta = manifest["metadata"]
        if live is None:
            # Created without forcing: if someone else made it since it was read, the apply
            # fails with a conflict and the next pass finds a NameConflict.
            return self.kube.apply(manifest, force=False)
        changes = foreign_changes(live, manifest, self._defaulted(manifest))
        try:
            if changes:
                logger.info(
                    "putting back %s %s/%s: %s",
                    manifest["kind"],
                    meta["namespace"],
                    meta["name"],
                    ", ".join(op["path"] for op in changes),
                )
                live = self.kube.json_patch(manifest, changes)
            if contains(live, manifest):
                return live
            return self.kube.apply(manifest)
        except ApiException as exc:
            if exc.status != 422 or manifest["kind"] not in RECREATED_KINDS:
                raise
            # Edited into something that cannot take the rendering (a PDB given minAvailable
            # beside maxUnavailable): made anew.
            logger.info(
                "recreating %s %s/%s: %s", manifest["kind"], meta["namespace"], meta["name"], api_message(exc)
            )
            self.kube.delete(manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"])
            return self.kube.apply(manifest, force=False)

    def _defaulted(self, manifest: Manifest) -> dict[str, Any] | None:
        """``manifest`` with the API server's defaults (kept per rendering), or None where the
        dry run is refused: then only the sections the operator owns whole are compared."""
        if manifest["kind"] not in DEFAULTED_KINDS:
            return None
        key = json.dumps(manifest, sort_keys=True)
        with self._guard:
            if key in self._defaults:
                return self._defaults[key]
        try:
            found: dict[str, Any] | None = self.kube.defaulted(manifest)
        except ApiException as exc:
            if self.kube.outage.covers(exc) or is_temporary(exc):
                raise
            meta = manifest["metadata"]
            self._log_once(
                meta["namespace"], meta["name"], f"cannot dry-run {manifest['kind']}: {api_message(exc)}"
            )
            found = None
        with self._guard:
            if len(self._defaults) >= MAX_DEFAULTS:
                self._defaults.clear()
            self._defaults[key] = found
        return found

    def _prune(self, owner: Owner, spec: ZImageServiceSpec, job_name: str) -> None:
        """Delete what this service owns but no longer wants: old prefetch Jobs, a cache
        claim, an HPA after a switch to another autoscaling mode, a NetworkPolicy turned off."""
        selector = f"{MANAGED_SELECTOR},app.kubernetes.io/instance={owner.name}"
        for job in self.kube.list_objects("batch/v1", "Job", owner.namespace, selector):
            name = job["metadata"]["name"]
            if _owned_by(job, owner) and (not spec.needs_cache or name != job_name):
                self.kube.delete("batch/v1", "Job", owner.namespace, name)
        if spec.autoscaling.mode != "hpa":
            hpa = self.kube.get("autoscaling/v2", "HorizontalPodAutoscaler", owner.namespace, owner.name)
            if hpa is not None and _owned_by(hpa, owner):
                self.kube.delete("autoscaling/v2", "HorizontalPodAutoscaler", owner.namespace, owner.name)
        # A ScaledObject of the operator's own only in keda mode above zero; from zero, the HTTP
        # add-on makes its own from the HTTPScaledObject (owned by that, so left alone here).
        wanted = (
            (
                "keda.sh/v1alpha1",
                "ScaledObject",
                spec.autoscaling.mode == "keda" and not spec.scales_from_zero,
            ),
            ("http.keda.sh/v1alpha1", "HTTPScaledObject", spec.scales_from_zero),
        )
        for api_version, kind, keep in wanted:
            crd = builders.KEDA_CRD if kind == "ScaledObject" else builders.HTTP_ADDON_CRD
            if keep or not self._crd_installed(crd):
                continue
            scaled = self.kube.get(api_version, kind, owner.namespace, owner.name)
            if scaled is not None and _owned_by(scaled, owner):
                self.kube.delete(api_version, kind, owner.namespace, owner.name)
        if not spec.network_policy.enabled:
            policy = self.kube.get("networking.k8s.io/v1", "NetworkPolicy", owner.namespace, owner.name)
            if policy is not None and _owned_by(policy, owner):
                self.kube.delete("networking.k8s.io/v1", "NetworkPolicy", owner.namespace, owner.name)
        if not spec.needs_cache:
            claim = self.kube.get(
                "v1", "PersistentVolumeClaim", owner.namespace, builders.cache_claim_name(owner)
            )
            if claim is not None and _owned_by(claim, owner):
                self.kube.delete("v1", "PersistentVolumeClaim", owner.namespace, claim["metadata"]["name"])

    def _write_status(
        self,
        body: dict[str, Any],
        owner: Owner,
        generation: int,
        *,
        spec: ZImageServiceSpec | None = None,
        invalid: str | None = None,
        apply_error: str | None = None,
        deployment: dict[str, Any] | None = None,
        replicas: int = 0,
        pods: list[dict[str, Any]] | None = None,
        model: ModelState | None = None,
        blocked: tuple[str, str] | None = None,
        vram_restart: dict[str, Any] | None = None,
        conflict: str | None = None,
        pod_problems: list[str] | None = None,
        rollout_held: str | None = None,
        refreshing: str | None = None,
    ) -> None:
        previous = body.get("status") or {}
        conditions = compute_conditions(
            refreshing=refreshing,
            adapter_failures=adapter_failures(previous, spec),
            invalid=invalid,
            conflict=conflict,
            pod_problems=pod_problems,
            rollout_held=rollout_held,
            apply_error=apply_error,
            blocked=blocked,
            model=model or model_state(False, None),
            desired_replicas=replicas,
            deployment=deployment,
            pods=pods or [],
        )
        if spec is not None and invalid is None:
            scaling = spec.autoscaling
            conditions.append(
                scaling_condition(scaling.mode, spec.replicas, scaling.min_replicas, scaling.max_replicas)
            )
        merged = merge_conditions(previous.get("conditions") or [], conditions, generation, now_rfc3339())
        dep_status = (deployment or {}).get("status") or {}
        status: dict[str, Any] = {
            "observedGeneration": generation,
            "replicas": int(dep_status.get("replicas") or 0),
            "readyReplicas": int(dep_status.get("readyReplicas") or 0),
            "updatedReplicas": int(dep_status.get("updatedReplicas") or 0),
            "selector": builders.selector_string(owner),
            "conditions": merged,
        }
        if spec is not None:
            status["endpoint"] = builders.endpoint(owner, spec)
        if vram_restart is not None:  # kept (a merge patch) once its pod is gone
            status["lastVramRestart"] = vram_restart
        if spec is not None and not spec.runtime.compile_artifacts.enabled and "compileArtifacts" in previous:
            status["compileArtifacts"] = None  # turned off: the daemon no longer reports it
        if spec is not None and not spec.loras and "adapters" in previous:
            status["adapters"] = None  # none configured: the daemon no longer reports them
        if _same(previous, status):
            return
        self.kube.patch_status(owner.namespace, owner.name, status)
        for condition in transitions(previous.get("conditions") or [], merged):
            kind = "Warning" if _bad(condition) else "Normal"
            self.post_event(
                body,
                kind,
                condition["reason"],
                f"{condition['type']}={condition['status']}: {condition['message']}",
            )

    def _report_vram_restarts(
        self, body: dict[str, Any], pods: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """An Event for each container restart whose termination message blames VRAM; returns
        the latest such restart among ``pods`` for the status, or None. What was reported is
        the status's ``lastVramRestart``: a restart no later than that one had its Event, by
        this operator or the one before it (a restart or a failover reports nothing twice)."""
        reported = _restart_order((body.get("status") or {}).get("lastVramRestart") or {})
        latest: dict[str, Any] | None = None
        for pod in pods:
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (status.get("lastState") or {}).get("terminated") or {}
                message = terminated.get("message") or ""
                if VRAM_WORDS not in message:
                    continue
                restart = {
                    "pod": pod["metadata"]["name"],
                    "container": status.get("name", ""),
                    "restartCount": int(status.get("restartCount") or 0),
                    "finishedAt": str(terminated.get("finishedAt") or ""),
                    "message": message.strip(),
                }
                if latest is None or restart["finishedAt"] > latest["finishedAt"]:
                    latest = restart
                if _restart_order(restart) <= reported:
                    continue
                event = f"pod {restart['pod']} was restarted: {restart['message']}"
                self.post_event(body, "Warning", "VramLimitRestart", event)
        return latest


def _restart_order(restart: dict[str, Any]) -> tuple[str, str, str, int]:
    """Restarts in the order they happened (then by pod and container, for ties)."""
    return (
        str(restart.get("finishedAt") or ""),
        str(restart.get("pod") or ""),
        str(restart.get("container") or ""),
        int(restart.get("restartCount") or 0),
    )


def _owned_by(obj: dict[str, Any], owner: Owner) -> bool:
    return any(ref.get("uid") == owner.uid for ref in obj["metadata"].get("ownerReferences") or [])


def owns(obj: dict[str, Any], owner: Owner) -> bool:
    """Whether ``obj`` is this service's to change: it names the service as its owner, or the
    operator wrote it (a child left behind by an earlier service of the same name, or orphaned by
    a ``kubectl delete --cascade=orphan``). Anything else belongs to someone else."""
    managers = {entry.get("manager") for entry in obj["metadata"].get("managedFields") or []}
    return _owned_by(obj, owner) or FIELD_MANAGER in managers


def _bad(condition: dict[str, Any]) -> bool:
    healthy = {"Ready": "True", "Degraded": "False", "ModelReady": "True"}
    expected = healthy.get(condition["type"])
    return expected is not None and condition["status"] != expected


def _refreshing(model: ModelState, deployment: dict[str, Any] | None) -> str | None:
    """Why the Deployment is left as it is: the prefetch Job fills the cache again (another model
    or Hub adapter) while its ready replicas serve; None when there is no such Deployment."""
    if model.ready or model.reason not in ("CachePending", "CacheDownloading") or deployment is None:
        return None
    ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    if ready == 0:
        return None
    return (
        f"{model.message}; the {ready} ready replica{'s' if ready != 1 else ''} keep serving the "
        "previous model and adapters until it is done, then roll"
    )


def adapter_failures(status: dict[str, Any], spec: ZImageServiceSpec | None) -> list[str]:
    """``adapter NAME on POD: why`` for each adapter of the spec a ready replica could not load,
    from ``status.adapters`` (written by the daemon from the pods' /load)."""
    if spec is None or not spec.loras:
        return []
    wanted = {lora.name for lora in spec.loras}
    return [
        f"adapter {failure.get('name')} on {failure.get('pod')}: {failure.get('reason')}"
        for failure in (status.get("adapters") or {}).get("failed") or []
        if failure.get("name") in wanted
    ]


def _same(previous: dict[str, Any], status: dict[str, Any]) -> bool:
    """Equal but for fields we do not own (such as status.autoscaling)."""
    subset = {key: previous.get(key) for key in status}
    return json.dumps(subset, sort_keys=True) == json.dumps(status, sort_keys=True)
