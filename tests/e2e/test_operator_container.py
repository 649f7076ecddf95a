"""The operator from the Dockerfile's image, installed with the chart, in runc containers on the
local cluster's kubelet node: the kubelet runs its probes, it reaches the API server through
the `kubernetes` Service (kube-proxy), it reconciles, and when the leading replica's container
is killed the standby takes over."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
import yaml

from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import wait_until

from .support import OPERATOR_NAMESPACE, kube_json

pytestmark = [pytest.mark.cluster, pytest.mark.kubelet, pytest.mark.slow]

NAMESPACE = OPERATOR_NAMESPACE


def tiny(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ZImageService",
        "metadata": {"name": name, "namespace": "e2e-apps"},
        "spec": {
            "model": {"source": "builtin://tiny"},
            "scheduling": {"nodeSelector": {"type": "kwok"}},
            "autoscaling": {"mode": "none"},
        },
    }


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
    pods = [
        p
        for p in kube_json(
            cluster, "get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=zimage-operator"
        )["items"]
        if not p["metadata"].get("deletionTimestamp")
    ]
    assert len(pods) == 2, "a leader and a standby"
    for pod in pods:
        assert pod["spec"]["nodeName"] == "node-0"
        (container,) = pod["status"]["containerStatuses"]
        assert container["containerID"].startswith("containerd://"), "a real container, not a simulation"
        assert container["ready"] is True, "the kubelet ran the probes and they passed"

    # It reconciles: a ZImageService placed on the simulated GPU node becomes Ready.
    cluster.kubectl("create", "namespace", "e2e-apps")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(tiny("tiny")))

    def ready(name: str) -> bool:
        status = kube_json(cluster, "get", "zimageservice", name, "-n", "e2e-apps").get("status", {})
        return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))

    wait_until(lambda: ready("tiny"), 120, "the operator in its container to make the service Ready")
    identity = leader_identity(cluster)
    leader = identity.rpartition("_")[0]
    logs = cluster.kubectl("logs", "-n", NAMESPACE, leader, check=False)
    assert logs.returncode == 0, logs.stderr  # the API server reaches the kubelet for logs
    assert "e2e-apps/tiny" in logs.stdout

    # SIGKILL of the leading replica's container: the kubelet restarts it, as a standby; the
    # other replica takes the Lease and reconciles a service applied meanwhile.
    (container_id,) = cluster.crictl(
        "node-0", "ps", "-q", "--label", f"io.kubernetes.pod.name={leader}"
    ).stdout.split()
    pid = json.loads(cluster.crictl("node-0", "inspect", container_id).stdout)["info"]["pid"]
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(tiny("after")))
    wait_until(lambda: ready("after"), 60, "the standby to take over and make the new service Ready")
    took = time.monotonic() - killed
    print(f"the standby reconciled a new service {took:.1f}s after the leader's container was killed")
    assert took < 30
    assert leader_identity(cluster) != identity, "another process leads (the other pod, or the restart)"
    cluster.kubectl("delete", "namespace", "e2e-apps", "--wait=false")


def leader_identity(cluster: LocalCluster) -> str:
    """The Lease's holder: ``POD_NAME_suffix``, the suffix new for each process."""

    def holder() -> str:
        lease = kube_json(cluster, "get", "lease", "zimage-operator", "-n", NAMESPACE)
        return str((lease.get("spec") or {}).get("holderIdentity") or "")

    return wait_until(holder, 60, "an operator replica to lead")
