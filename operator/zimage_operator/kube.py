"""The few API calls the operator makes, over the official Kubernetes client.

Children are written with server-side apply under one field manager. Every write goes through
here and is counted, so "no change, no write" can be checked.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from .builders import API_VERSION, KIND
from .config import FIELD_MANAGER
from .failures import OutageLog, describe, namespace_terminating
from .metrics import API_REQUESTS, WRITES
from .status import now_rfc3339

logger = logging.getLogger(__name__)


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
    api = client.ApiClient(configuration)
    send = api.rest_client.request

    def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        # Every request of the client (typed APIs and the dynamic one) passes here.
        API_REQUESTS.labels(method).inc()
        return send(method, url, *args, **kwargs)

    api.rest_client.request = counted
    return api


class Kube:
    def __init__(self, api_client: client.ApiClient, outage: OutageLog | None = None) -> None:
        self.api_client = api_client
        self.outage = outage or OutageLog()
        self._dynamic: DynamicClient | None = None
        self._lock = threading.Lock()
        self._resources: dict[tuple[str, str], Any] = {}

    def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        with self._lock:
            if self._dynamic is None:
                self._dynamic = DynamicClient(self.api_client)
            if key not in self._resources:
                self._resources[key] = self._dynamic.resources.get(api_version=api_version, kind=kind)
            return self._resources[key]

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self._resource(api_version, kind).get(name=name, namespace=namespace or None)
        except NotFoundError:
            return None
        result: dict[str, Any] = obj.to_dict()
        return result

    def list_objects(
        self, api_version: str, kind: str, namespace: str, selector: str
    ) -> list[dict[str, Any]]:
        items = self._resource(api_version, kind).get(namespace=namespace, label_selector=selector).items
        return [item.to_dict() for item in items]

    def list_events(self, namespace: str, field_selector: str) -> list[dict[str, Any]]:
        items = self._resource("v1", "Event").get(namespace=namespace, field_selector=field_selector).items
        return [item.to_dict() for item in items]

    def apply(self, manifest: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply; ``force`` takes over fields another manager set (only ever on an
        object the operator owns)."""
        meta = manifest["metadata"]
        WRITES.labels(manifest["kind"], "apply").inc()
        logger.info("applying %s %s/%s", manifest["kind"], meta["namespace"], meta["name"])
        obj = self._resource(manifest["apiVersion"], manifest["kind"]).server_side_apply(
            body=manifest,
            name=meta["name"],
            namespace=meta["namespace"],
            field_manager=FIELD_MANAGER,
            force_conflicts=force,
        )
        result: dict[str, Any] = obj.to_dict()
        return result

    def defaulted(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """``manifest`` as the API server would store it, defaults filled in: a server-side dry
        run of creating it under a generated name (nothing is stored)."""
        body = copy.deepcopy(manifest)
        meta = body["metadata"]
        meta["generateName"] = f"{meta.pop('name')[:50]}-"
        obj = self._resource(manifest["apiVersion"], manifest["kind"]).create(
            body=body, namespace=meta["namespace"], dry_run="All"
        )
        result: dict[str, Any] = obj.to_dict()
        return result

    def json_patch(self, manifest: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
        """Apply JSON patch ``operations`` to the live object ``manifest`` names."""
        meta = manifest["metadata"]
        WRITES.labels(manifest["kind"], "patch").inc()
        obj = self._resource(manifest["apiVersion"], manifest["kind"]).patch(
            body=operations,
            name=meta["name"],
            namespace=meta["namespace"],
            content_type="application/json-patch+json",
            field_manager=FIELD_MANAGER,
        )
        result: dict[str, Any] = obj.to_dict()
        return result

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        WRITES.labels(kind, "delete").inc()
        logger.info("deleting %s %s/%s", kind, namespace, name)
        with contextlib.suppress(NotFoundError):
            self._resource(api_version, kind).delete(
                name=name, namespace=namespace, body={"propagationPolicy": "Background"}
            )

    # -- the custom resource -----------------------------------------------------------------

    def get_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(API_VERSION, KIND, namespace, name)

    def list_services(self, namespaces: list[str]) -> list[dict[str, Any]]:
        resource = self._resource(API_VERSION, KIND)
        if not namespaces:
            return [item.to_dict() for item in resource.get().items]
        found: list[dict[str, Any]] = []
        for namespace in namespaces:
            found.extend(item.to_dict() for item in resource.get(namespace=namespace).items)
        return found

    def post_event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """A Kubernetes Event about ``body``, best effort: one that cannot be posted (an outage,
        a namespace being deleted) is logged at debug level, else as a warning, and never
        raises. Posted with the operator's own client: Kopf's event helpers work only inside
        its resource handlers, and the periodic passes are not one."""
        meta = body["metadata"]
        now = now_rfc3339()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": body.get("apiVersion") or API_VERSION,
                "kind": body.get("kind") or KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": kind,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._resource("v1", "Event").create(body=event, namespace=meta["namespace"])
        except Exception as exc:
            going = isinstance(exc, ApiException) and (namespace_terminating(exc) or exc.status == 404)
            quiet = going or self.outage.covers(exc)
            logger.log(
                logging.DEBUG if quiet else logging.WARNING,
                "could not post the event %s on %s/%s: %s",
                reason,
                meta["namespace"],
                meta["name"],
                describe(exc),
            )

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        WRITES.labels(KIND, "status").inc()
        self._resource(API_VERSION, KIND).status.patch(
            body={"status": status},
            name=name,
            namespace=namespace,
            content_type="application/merge-patch+json",
        )
