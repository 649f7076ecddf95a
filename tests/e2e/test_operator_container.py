"""The operator from the Dockerfile's image, installed with the chart, in a runc container on the
local cluster's kubelet node: the kubelet runs its probes, it reaches the API server through
the `kubernetes` Service (kube-proxy), and it reconciles."""

from __future__ import annotations

import pytest
import yaml

from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import wait_until

from .support import OPERATOR_NAMESPACE, kube_json

pytestmark = [pytest.mark.cluster, pytest.mark.kubelet, pytest.mark.slow]

NAMESPACE = OPERATOR_NAMESPACE


def test_the_chart_runs_the_operator_image_in_a_container_and_it_reconciles(
    operator_release: LocalCluster,
) -> None:
    cluster = operator_release
    rollout = cluster.kubectl(
        "rollout",
        "status",
        "deployment/zimage-zimage-operator",
        "-n",
        NAMESPACE,
        "--timeout=180s",
        check=False,
    )
    assert rollout.returncode == 0, rollout.stdout + rollout.stderr
    (pod,) = [
        p
        for p in kube_json(
            cluster, "get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=zimage-operator"
        )["items"]
        if not p["metadata"].get("deletionTimestamp")
    ]
    assert pod["spec"]["nodeName"] == "node-0"
    (container,) = pod["status"]["containerStatuses"]
    assert container["containerID"].startswith("containerd://"), "a real container, not a simulation"
    assert container["ready"] is True, "the kubelet ran the readiness probe and it passed"

    # It reconciles: a ZImageService placed on the simulated GPU node becomes Ready.
    cluster.kubectl("create", "namespace", "e2e-apps")
    service = {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ZImageService",
        "metadata": {"name": "tiny", "namespace": "e2e-apps"},
        "spec": {
            "model": {"source": "builtin://tiny"},
            "scheduling": {"nodeSelector": {"type": "kwok"}},
            "autoscaling": {"mode": "none"},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(service))

    def ready() -> bool:
        status = kube_json(cluster, "get", "zimageservice", "tiny", "-n", "e2e-apps").get("status", {})
        return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))

    wait_until(ready, 120, "the operator in its container to make the service Ready")
    logs = cluster.kubectl("logs", "-n", NAMESPACE, pod["metadata"]["name"], check=False)
    assert logs.returncode == 0, logs.stderr  # the API server reaches the kubelet for logs
    assert "e2e-apps/tiny" in logs.stdout
    cluster.kubectl("delete", "namespace", "e2e-apps", "--wait=false")
