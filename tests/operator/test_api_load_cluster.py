"""What an idle ZImageService costs the API server: the requests the leading operator's own code
sends (``zimage_operator_api_requests_total``), per service and second, with services that are
Ready and idle (built-in autoscaling reading their pods' /load every 2 s)."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from kubernetes import client

from tests.cluster.fixtures import leader_ip
from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import LocalPodRunner

from .test_operator_cluster import apply, wait_ready, zis

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
SERVICES = 8
WINDOW_SECONDS = 60.0
GOAL = 0.1  # requests per second per idle service


def requests_sent(address: str) -> float:
    text = httpx.get(f"http://{address}:8080/metrics", timeout=5).text
    return sum(
        float(n) for n in re.findall(r"^zimage_operator_api_requests_total\{[^}]*\} (\S+)$", text, re.M)
    )


def rate(address: str, seconds: float) -> float:
    before = requests_sent(address)
    time.sleep(seconds)
    return (requests_sent(address) - before) / seconds


def test_an_idle_service_costs_the_api_server_under_a_tenth_of_a_request_a_second(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    address = leader_ip(operator, api)
    # The operator's own steady work with no service of this test: the Lease, the permission check.
    baseline = rate(address, WINDOW_SECONDS)
    # Pods of an image the local pod runner does not run: Ready on their simulated nodes, and
    # every /load read of the autoscaler refused at once (no process to answer it).
    image = "registry.example/idle-server:1"
    names = [f"idle-{i}" for i in range(SERVICES)]
    apply(cluster, namespace, *(zis(name, runtime={"image": image}) for name in names))
    for name in names:
        wait_ready(api, namespace, name)
    time.sleep(5)  # the first passes' status writes
    loaded = rate(address, WINDOW_SECONDS)
    per_service = (loaded - baseline) / SERVICES
    print(
        f"API requests/s: {baseline:.3f} without the services, {loaded:.3f} with {SERVICES} idle ones: "
        f"{per_service:.4f} per idle service over {WINDOW_SECONDS:.0f}s"
    )
    assert per_service < GOAL
