"""`helm install` of the chart into a fresh local control plane: the real operator runs under
the chart's service account and reconciles the chart's example; upgrade and uninstall."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import LocalPodRunner, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "zimage-operator"
NAMESPACE = "zimage-system"


@pytest.fixture
def fresh_cluster(cluster_binaries: Path, tmp_path: Path) -> Iterator[LocalCluster]:
    local = LocalCluster(workdir=tmp_path / "cluster", binaries=cluster_binaries, gpu_nodes=1)
    local.up()
    try:
        yield local
    finally:
        local.down()


def test_helm_install_upgrade_and_uninstall(fresh_cluster: LocalCluster, tmp_path: Path) -> None:
    cluster = fresh_cluster

    def helm(*args: str) -> subprocess.CompletedProcess[str]:
        return cluster.helm(tmp_path, *args, namespace=NAMESPACE)

    def operator_pods() -> list[dict[str, Any]]:
        out = cluster.kubectl(
            "get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=zimage-operator", "-o", "json"
        )
        return [p for p in json.loads(out.stdout)["items"] if not p["metadata"].get("deletionTimestamp")]

    values = ["--set", "example.enabled=true", "--set", "example.modelSource=builtin://tiny"]
    installed = helm("install", "zimage", str(CHART), "--create-namespace", *values)
    assert installed.returncode == 0, installed.stderr
    assert "kubectl get zis" in installed.stdout, "NOTES tell the next step"

    with LocalPodRunner(
        cluster.kubeconfig, tmp_path / "pods", images=frozenset({"zimage-operator"})
    ) as runner:
        wait_until(lambda: len(runner.pids()) == 2, 60, "the operator processes: a leader, a standby")
        pods = operator_pods()
        assert len(pods) == 2
        for pod in pods:
            assert pod["spec"]["serviceAccountName"] == "zimage-zimage-operator"
            # One node here: the anti-affinity is a preference, so both replicas still run.
            assert pod["spec"]["nodeName"] == "gpu-node-0"

        def example_ready() -> bool:
            return cluster.condition("zis", "example", NAMESPACE) == "True"

        wait_until(example_ready, 60, "the chart's example ZImageService to be Ready")

        tested = helm("test", "zimage", "--timeout", "60s")
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert "Phase:          Succeeded" in tested.stdout

        first = {pod["metadata"]["uid"] for pod in pods}
        upgraded = helm("upgrade", "zimage", str(CHART), *values, "--set", "logLevel=debug")
        assert upgraded.returncode == 0, upgraded.stderr

        def rolled() -> bool:
            pods = operator_pods()
            return len(pods) == 2 and not first & {pod["metadata"]["uid"] for pod in pods}

        wait_until(rolled, 120, "the operator to roll to the new values")
        for pod in operator_pods():
            env_values = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
            assert env_values["ZIMAGE_OPERATOR_LOG_LEVEL"] == "debug"
        wait_until(lambda: len(runner.pids()) == 2, 60, "two operator processes after the roll")
        # One of the new replicas leads and keeps the example Ready.
        cluster.kubectl("annotate", "zis", "example", "-n", NAMESPACE, "touched=1")
        wait_until(example_ready, 60, "the example to stay Ready under the new leader")

        uninstalled = helm("uninstall", "zimage", "--wait")
        assert uninstalled.returncode == 0, uninstalled.stderr
        deadline = time.monotonic() + 60
        while operator_pods() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert operator_pods() == []
    leftovers = cluster.kubectl(
        "get", "deployments,serviceaccounts,services,roles,rolebindings", "-n", NAMESPACE,
        "-l", "app.kubernetes.io/instance=zimage", "-o", "name",
    ).stdout.strip()  # fmt: skip
    cluster_wide = cluster.kubectl(
        "get", "clusterroles,clusterrolebindings", "-l", "app.kubernetes.io/instance=zimage", "-o", "name"
    ).stdout.strip()
    assert (leftovers, cluster_wide) == ("", "")
