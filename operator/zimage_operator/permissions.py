"""What the operator's account may do, against what it needs: asked of the API server with
SelfSubjectAccessReviews where the operator watches (each namespace, or the whole cluster).

A permission missing is logged once, with the rule to grant, and while the operator cannot
watch its resources its liveness endpoint fails. Kopf alone would retry a refused watch
every few seconds forever while saying it is alive.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubernetes import client

from .config import OperatorSettings

if TYPE_CHECKING:  # kube.py imports what imports this module
    from .kube import Kube

logger = logging.getLogger(__name__)

WATCH = ("get", "list", "watch")
WRITE = ("create", "patch")


@dataclass(frozen=True)
class Need:
    group: str
    resource: str
    verbs: tuple[str, ...]
    subresource: str = ""
    watched: bool = True  # without it the operator cannot watch its resources: liveness fails

    def rule(self) -> str:
        name = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        return f"{name}{'.' + self.group if self.group else ''}"


# The same rules as deploy/operator/rbac.yaml and the chart's (a test keeps them together).
NEEDS = (
    Need("zimage.dev", "zimageservices", WATCH),
    Need("zimage.dev", "zimageservices", ("patch",), subresource="status", watched=False),
    Need("apps", "deployments", WATCH + WRITE),
    Need("", "services", WATCH + WRITE),
    Need("policy", "poddisruptionbudgets", (*WATCH, *WRITE, "delete")),
    Need("networking.k8s.io", "networkpolicies", (*WATCH, *WRITE, "delete")),
    Need("batch", "jobs", (*WATCH, *WRITE, "delete")),
    Need("", "persistentvolumeclaims", (*WATCH, *WRITE, "delete")),
    Need("autoscaling", "horizontalpodautoscalers", (*WATCH, *WRITE, "delete")),
    Need("", "pods", ("list", "watch")),
    Need("", "events", ("create", "list"), watched=False),
    Need("keda.sh", "scaledobjects", ("get", *WRITE, "delete"), watched=False),
    Need("http.keda.sh", "httpscaledobjects", ("get", *WRITE, "delete"), watched=False),
)


@dataclass(frozen=True)
class Missing:
    need: Need
    verbs: tuple[str, ...]
    namespace: str  # "" for the whole cluster

    def describe(self) -> str:
        where = f"in namespace {self.namespace}" if self.namespace else "cluster-wide"
        return f"{', '.join(self.verbs)} on {self.need.rule()} {where}"


def missing_permissions(api_client: client.ApiClient, namespaces: list[str]) -> list[Missing]:
    """Each need the account lacks a verb of, where the operator watches ([] = all namespaces)."""
    authorization = client.AuthorizationV1Api(api_client)
    found = []
    for namespace in namespaces or [""]:
        for need in NEEDS:
            lacking = tuple(verb for verb in need.verbs if not _allowed(authorization, need, verb, namespace))
            if lacking:
                found.append(Missing(need, lacking, namespace))
    return found


def _allowed(authorization: client.AuthorizationV1Api, need: Need, verb: str, namespace: str) -> bool:
    review = client.V1SelfSubjectAccessReview(
        spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(
                group=need.group,
                resource=need.resource,
                subresource=need.subresource or None,
                verb=verb,
                namespace=namespace or None,
            )
        )
    )
    answer = authorization.create_self_subject_access_review(review)
    return bool(answer.status.allowed)


class PermissionReport:
    """The last check's result: logged when it changes, and what liveness answers from."""

    def __init__(self) -> None:
        self.missing: list[Missing] = []
        self._said: tuple[str, ...] | None = None

    @property
    def cannot_watch(self) -> list[Missing]:
        return [item for item in self.missing if item.need.watched]

    def update(self, missing: list[Missing]) -> None:
        self.missing = missing
        said = tuple(item.describe() for item in missing)
        if said == self._said:
            return
        if missing:
            logger.warning(
                "the operator's account lacks permissions it needs: %s. Grant them with a Role (one "
                "per watched namespace) or ClusterRole bound to its ServiceAccount: the chart does "
                "with rbac.create, and deploy/operator/rbac.yaml lists every rule",
                "; ".join(said),
            )
        elif self._said:
            logger.info("the operator's account now has every permission it needs")
        self._said = said

    def health_problem(self) -> str | None:
        blocked = self.cannot_watch
        if not blocked:
            return None
        return "cannot watch its resources: lacks " + "; ".join(item.describe() for item in blocked)


REPORT = PermissionReport()


async def check_permissions(kube: Kube, settings: OperatorSettings) -> None:
    """Compare the account's permissions with what the operator needs, now and every
    ``permission_check_seconds`` (a grant or a revocation shows without a restart)."""
    while True:
        try:
            missing = await asyncio.to_thread(missing_permissions, kube.api_client, settings.namespaces)
        except Exception as exc:
            if not kube.outage.record(exc):
                logger.warning("cannot check the operator's permissions: %s: %s", type(exc).__name__, exc)
        else:
            REPORT.update(missing)
        await asyncio.sleep(settings.permission_check_seconds)
