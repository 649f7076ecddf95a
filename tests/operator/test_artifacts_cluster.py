"""Shared compile artifacts on the local cluster: the tiny model's servers compile on this
machine's CPU, the first replica saves what it compiled into the claim, the second one loads
it, and the service's status says so."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import LocalPodRunner

from .test_operator_cluster import apply, get, wait_for, zis

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _claim(cluster: LocalCluster, namespace: str, name: str) -> None:
    """A ReadWriteMany claim and a volume bound to it (the pod runner keeps its files)."""
    docs = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"{namespace}-{name}"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "hostPath": {"path": f"/tmp/zimage-test-{name}"},
                "claimRef": {"namespace": namespace, "name": name},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    ]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))


def _artifacts_status(api: client.ApiClient, namespace: str, name: str, pods: dict[str, int]) -> Any:
    def reported() -> dict[str, Any] | None:
        found = (get(api, namespace, name).get("status") or {}).get("compileArtifacts") or {}
        return found if found.get("pods") == pods else None

    return wait_for(reported, 600, f"status.compileArtifacts.pods == {pods}")


def test_the_second_replica_loads_the_compile_artifacts_the_first_wrote(
    operator: LocalPodRunner,
    pod_runner: LocalPodRunner,
    cluster: LocalCluster,
    api: client.ApiClient,
    namespace: str,
) -> None:
    _claim(cluster, namespace, "kernels")
    spec: dict[str, Any] = {
        "model": {"source": "builtin://tiny"},
        "runtime": {
            "compileArtifacts": {"enabled": True, "claimName": "kernels"},
            "warmupSizes": ["256x256"],
            "maxBatchSize": 1,  # the warm-up's two calls instead of six (no batch shapes)
        },
        "autoscaling": {"mode": "none"},
        "replicas": 1,
    }
    try:
        apply(cluster, namespace, zis("shared", **spec))
        first = _artifacts_status(api, namespace, "shared", {"saved": 1})
        assert first["state"] == "Available"
        folder = pod_runner.workdir / "claims" / f"{namespace}_kernels"
        (artifact,) = folder.glob("zimage-compile-*.bin")
        assert first["artifacts"] == [artifact.name]

        # Another replica, on the other node: its own empty compile cache, the claim's file.
        apply(cluster, namespace, zis("shared", **{**spec, "replicas": 2}))
        both = _artifacts_status(api, namespace, "shared", {"saved": 1, "loaded": 1})
        assert both["state"] == "Available"
        assert both["artifacts"] == [artifact.name]
        assert "2 of 2 ready replicas use the shared compile artifacts" in both["message"]
        assert list(folder.glob("zimage-compile-*.bin")) == [artifact], "the second replica wrote again"

        # Turned off, the report goes with it.
        off = {**spec, "runtime": {"warmupSizes": ["256x256"]}, "replicas": 1}
        apply(cluster, namespace, zis("shared", **off))
        wait_for(
            lambda: "compileArtifacts" not in (get(api, namespace, "shared").get("status") or {}),
            60,
            "status.compileArtifacts removed",
        )
    finally:
        cluster.kubectl("delete", "zis", "shared", "-n", namespace, "--wait=true", check=False)
        cluster.kubectl("delete", "pv", f"{namespace}-kernels", "--wait=false", check=False)
