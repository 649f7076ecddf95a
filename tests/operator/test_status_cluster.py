"""Status tells the truth on the real control plane: a blocker turns Degraded with the
scheduler's own words within 30 seconds, and Ready stays False meanwhile."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import LocalPodRunner

from .test_operator_cluster import apply, condition, get, wait_for

pytestmark = pytest.mark.cluster


def _degraded(api: client.ApiClient, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        body = get(api, namespace, name)
        item = condition(body, "Degraded")
        return body if item.get("status") == "True" and item.get("reason") == reason else None

    result: dict[str, Any] = wait_for(found, 30, f"Degraded={reason} on {name}")
    return result


def _zis(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ZImageService",
        "metadata": {"name": name},
        "spec": spec,
    }


def test_pods_no_node_can_take_are_degraded_with_the_schedulers_message(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    scheduling = {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-B300"}}
    apply(cluster, namespace, _zis("nowhere", scheduling=scheduling))
    body = _degraded(api, namespace, "nowhere", "Unschedulable")
    message = condition(body, "Degraded")["message"]
    assert "nowhere-" in message
    assert "node(s) didn't match Pod's node affinity/selector" in message
    assert condition(body, "Ready")["status"] == "False"


def test_a_missing_model_claim_is_degraded_with_the_schedulers_message(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, _zis("orphan", model={"source": "pvc://no-such-claim/z-image"}))
    body = _degraded(api, namespace, "orphan", "Unschedulable")
    assert 'persistentvolumeclaim "no-such-claim" not found' in condition(body, "Degraded")["message"]
    assert condition(body, "Ready")["status"] == "False"


def test_a_prefetch_job_stuck_on_an_unbound_claim_is_degraded_not_downloading(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    model = {"source": "hf://Tongyi-MAI/Z-Image-Turbo", "cache": {"size": "40Gi"}}
    apply(cluster, namespace, _zis("stuck", model=model))
    body = _degraded(api, namespace, "stuck", "CacheBlocked")
    # The scheduler's own words: which, depends on whether it has seen the claim yet.
    message = condition(body, "Degraded")["message"]
    assert any(
        words in message
        for words in ("unbound immediate PersistentVolumeClaims", 'persistentvolumeclaim "stuck-model-cache"')
    ), message
    assert condition(body, "ModelReady")["reason"] == "CacheBlocked"
    assert condition(body, "Ready")["status"] == "False"
