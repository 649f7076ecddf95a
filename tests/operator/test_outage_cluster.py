"""The operator through an API server outage: one warning, no tracebacks, and back to work
within seconds of the API server's return. Its metrics are on its health port."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from kubernetes import client

from tests.cluster.fixtures import leader_ip, leading_process
from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import LocalPodRunner

from .test_operator_cluster import apply, wait_for, wait_ready, zis

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _operator_log(operator: LocalPodRunner, api: client.ApiClient) -> Path:
    """The log of the replica that leads (the other stands by)."""
    log: Path = leading_process(operator, api).log
    return log


def _env(api: client.ApiClient, namespace: str, name: str) -> dict[str, str]:
    deployment = client.AppsV1Api(api).read_namespaced_deployment(name, namespace)
    return {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}


def test_an_api_server_outage_is_one_warning_and_recovery_takes_seconds(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, zis("steady", autoscaling={"mode": "none"}, replicas=1))
    wait_ready(api, namespace, "steady")
    log = _operator_log(operator, api)
    offset = log.stat().st_size

    cluster.restart_apiserver(down_seconds=60)
    returned = time.monotonic()
    changed = zis("steady", autoscaling={"mode": "none"}, replicas=1, runtime={"maxBatchSize": 8})
    assert apply(cluster, namespace, changed).returncode == 0
    wait_for(lambda: _env(api, namespace, "steady")["ZIMAGE_MAX_BATCH_SIZE"] == "8", 10, "the change")
    print(f"change reconciled {time.monotonic() - returned:.1f}s after the API server returned")
    assert time.monotonic() - returned < 5 + 2  # 5 s, and the kubectl apply that made the change
    wait_ready(api, namespace, "steady")

    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read().decode(errors="replace")
    assert "Traceback" not in text, text
    # Services that earlier tests left behind in terminating namespaces have their own news.
    loud = [
        line
        for line in text.splitlines()
        if re.search(r" (WARNING|ERROR|CRITICAL) ", line)
        and (namespace in line or not re.search(r"\bt\d+-", line))
    ]
    assert len([line for line in loud if "the API server is unreachable" in line]) == 1, loud
    assert len(loud) <= 2, loud
    assert "the API server is reachable again" in text

    # The controller manager's watches come back more slowly than the operator's (its
    # ReplicaSet controller waits for a cache as new as its last write): the tests after this
    # one start once a new service runs again.
    apply(cluster, namespace, zis("after", autoscaling={"mode": "none"}, replicas=1))
    wait_ready(api, namespace, "after", timeout=300)


def test_the_operator_reports_its_work_as_metrics(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, zis("counted"))
    wait_ready(api, namespace, "counted")
    address = leader_ip(operator, api)

    def read() -> dict[str, str]:
        text = httpx.get(f"http://{address}:8080/metrics", timeout=5).text
        return dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("zimage_operator_"))

    hold = 'zimage_operator_autoscaler_decisions_total{direction="hold"}'
    # The service's first autoscaler pass comes one autoscale interval (2 s) after its daemon starts.
    samples = wait_for(lambda: (found := read()).get(hold) and found, 30, "an autoscaler decision")
    assert float(samples['zimage_operator_reconciles_total{outcome="ok"}']) > 0
    assert float(samples['zimage_operator_writes_total{kind="Deployment",verb="apply"}']) > 0
    assert float(samples['zimage_operator_autoscaler_decisions_total{direction="hold"}']) > 0
    assert samples["zimage_operator_api_reachable"] == "1.0"


def test_a_deleted_service_is_forgotten(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    """No finalizer holds the service; the operator learns of the deletion from its watch and
    drops what it kept for it (state kept for deleted services would be a leak)."""
    apply(cluster, namespace, zis("brief", autoscaling={"mode": "none"}, replicas=1))
    wait_ready(api, namespace, "brief")
    log = _operator_log(operator, api)
    offset = log.stat().st_size
    deleted = cluster.kubectl("delete", "zis", "brief", "-n", namespace, "--wait=true", "--timeout=10s")
    assert deleted.returncode == 0, deleted.stderr

    def ended() -> bool:
        with log.open("rb") as handle:
            handle.seek(offset)
            return f"{namespace}/brief is gone; what the operator kept" in handle.read().decode(
                errors="replace"
            )

    wait_for(ended, 10, "the service to be forgotten")  # at the next pass after the deletion
    text = httpx.get(f"http://{leader_ip(operator, api)}:8080/metrics", timeout=5).text
    assert "zimage_operator_service_loops " in text
