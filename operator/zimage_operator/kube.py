"""The few API calls the operator makes, over the official Kubernetes client.

Children are written with server-side apply under one field manager. Every write goes through
here and is counted, so "no change, no write" can be checked.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import threading
import time
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError
from prometheus_client import Counter

from .builders import API_VERSION, KIND
from .config import FIELD_MANAGER

logger = logging.getLogger(__name__)

WRITES = Counter("zimage_operator_writes", "Writes the operator sent to the API server", ["kind", "verb"])


class Kube:
    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
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

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        WRITES.labels(manifest["kind"], "apply").inc()
        logger.info("applying %s %s/%s", manifest["kind"], meta["namespace"], meta["name"])
        obj = self._resource(manifest["apiVersion"], manifest["kind"]).server_side_apply(
            body=manifest,
            name=meta["name"],
            namespace=meta["namespace"],
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
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

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        WRITES.labels(KIND, "status").inc()
        self._resource(API_VERSION, KIND).status.patch(
            body={"status": status},
            name=name,
            namespace=namespace,
            content_type="application/merge-patch+json",
        )

    def post_event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """A core/v1 Event on ``body``, as ``kubectl describe`` shows them. Best effort."""
        meta = body["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=body.get("apiVersion", API_VERSION),
                kind=body.get("kind", KIND),
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            type=kind,
            reason=reason,
            message=message[:1024],
            source=client.V1EventSource(component=FIELD_MANAGER),
            reporting_component=FIELD_MANAGER,
            reporting_instance=FIELD_MANAGER,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        WRITES.labels("Event", "create").inc()
        try:
            self.core.create_namespaced_event(meta["namespace"], event)
        except ApiException as exc:
            logger.warning("could not post event %s on %s: %s", reason, meta["name"], api_message(exc))


def unreachable(exc: BaseException) -> bool:
    """The API server could not be reached at all (as opposed to answering with an error)."""
    if isinstance(exc, ApiException):
        return not exc.status
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError)


class OutageLog:
    """One warning when the API server becomes unreachable and one line when it is back,
    however many calls fail in between."""

    def __init__(self) -> None:
        self._since: float | None = None
        self._lock = threading.Lock()

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self._since is not None:
                return
            self._since = time.monotonic()
        logger.warning("the API server is unreachable (%s); retrying with backoff", _first_line(exc))

    def succeeded(self) -> None:
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            logger.info("the API server is reachable again after %.0fs", time.monotonic() - since)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


OUTAGE = OutageLog()


def is_temporary(exc: ApiException) -> bool:
    """Worth retrying: conflicts, throttling, server trouble. Other 4xx need a spec change."""
    return exc.status in (409, 429) or exc.status is None or exc.status >= 500


def api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)
