"""`kubectl scale zis` does what a user expects in every autoscaling mode: the replica count in
mode none, a floor above minReplicas in the autoscaled ones, refused above maxReplicas."""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import LocalPodRunner

from .test_operator_cluster import apply, get, wait_for, wait_ready, zis

pytestmark = pytest.mark.cluster


def _replicas(api: client.ApiClient, namespace: str, name: str) -> int:
    return int(client.AppsV1Api(api).read_namespaced_deployment(name, namespace).spec.replicas)


def test_scale_sets_the_count_in_mode_none(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, zis("fixed", autoscaling={"mode": "none"}, replicas=1))
    wait_ready(api, namespace, "fixed")
    cluster.kubectl("scale", "zis/fixed", "-n", namespace, "--replicas=3")
    wait_for(lambda: _replicas(api, namespace, "fixed") == 3, 30, "three replicas")


def test_scale_sets_the_floor_of_the_builtin_autoscaler(
    operator: LocalPodRunner,
    pod_runner: LocalPodRunner,
    cluster: LocalCluster,
    api: client.ApiClient,
    namespace: str,
) -> None:
    """Real tiny servers answer the autoscaler's load reads: a pod it cannot read is never taken
    for idle, so without them nothing would scale down."""
    scaling = {"mode": "builtin", "minReplicas": 1, "maxReplicas": 4, "scaleDownStabilizationSeconds": 0}
    runtime = {"warmupSizes": ["256x256"]}
    apply(
        cluster,
        namespace,
        zis("floored", model={"source": "builtin://tiny"}, autoscaling=scaling, runtime=runtime),
    )
    wait_ready(api, namespace, "floored")
    assert _replicas(api, namespace, "floored") == 1

    cluster.kubectl("scale", "zis/floored", "-n", namespace, "--replicas=3")
    wait_for(lambda: _replicas(api, namespace, "floored") == 3, 30, "the floor of three")
    # No load at all, and no stabilization window: only the floor holds it at three.
    wait_for(
        lambda: (
            (get(api, namespace, "floored").get("status") or {}).get("autoscaling", {}).get("currentReplicas")
            == 3
        ),
        30,
        "the autoscaler to see three replicas",
    )
    assert _replicas(api, namespace, "floored") == 3

    refused = cluster.kubectl("scale", "zis/floored", "-n", namespace, "--replicas=9", check=False)
    assert refused.returncode != 0
    assert "must not exceed autoscaling.maxReplicas" in refused.stderr, refused.stderr

    cluster.kubectl("scale", "zis/floored", "-n", namespace, "--replicas=1")
    wait_for(lambda: _replicas(api, namespace, "floored") == 1, 120, "back to minReplicas")
