"""Leader election on the local cluster: one operator replica acts, another stands by and takes
over when the leader is gone; a second copy with other settings only stands by."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from kubernetes import client

from tests.cluster.fixtures import (
    OPERATOR_NAMESPACE,
    kill_leader,
    leader_identity,
    leader_pod,
    leading_process,
)
from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import LocalPodRunner
from zimage_operator.election import LeaderElector
from zimage_server.core.processes import free_ports

from .test_operator_cluster import apply, get, wait_for, wait_ready, zis

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_one_elector_leads_a_standby_takes_over_when_it_stops_renewing_or_gives_up(
    cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    first = LeaderElector(api, namespace, "lease", identity="first", lease_seconds=4, retry_seconds=0.5)
    second = LeaderElector(api, namespace, "lease", identity="second", lease_seconds=4, retry_seconds=0.5)
    assert first.try_acquire_or_renew()
    assert not second.try_acquire_or_renew()
    assert second.holder() == "first"
    assert first.try_acquire_or_renew(), "the leader renews"

    # The leader stops renewing (killed): the standby waits out the lease by its own clock.
    stopped = time.monotonic()
    assert second.wait_for_leadership(threading.Event())
    waited = time.monotonic() - stopped
    assert 3.5 <= waited <= 6, f"took over after {waited:.1f}s of a 4s lease"
    assert not first.try_acquire_or_renew()
    assert first.holder() == "second", "the old leader sees it lost"

    # A leader that stops on purpose gives the Lease up: the other takes it at once.
    second.release()
    assert first.try_acquire_or_renew()
    lease = client.CoordinationV1Api(api).read_namespaced_lease("lease", namespace)
    assert lease.spec.holder_identity == "first"
    assert lease.spec.lease_transitions == 2


def test_a_standby_counts_again_after_the_lease_could_not_be_read(
    cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    """After an outage every replica saw, the leader renews before the standby may take over:
    the standby's count restarts when it can read the Lease again."""
    leader = LeaderElector(api, namespace, "lease", identity="leader", lease_seconds=4, retry_seconds=0.5)
    assert leader.try_acquire_or_renew()
    unreachable = client.Configuration()
    unreachable.host, unreachable.retries = "http://127.0.0.1:9", 0
    blind = LeaderElector(
        client.ApiClient(unreachable), namespace, "lease", identity="standby", lease_seconds=4
    )
    standby = LeaderElector(api, namespace, "lease", identity="standby", lease_seconds=4, retry_seconds=0.5)
    assert not standby.try_acquire_or_renew()
    time.sleep(4.5)  # the outage: the leader could not renew, the standby could not read
    standby.api = blind
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()
    assert not standby.wait_for_leadership(stop)
    standby.api = client.CoordinationV1Api(api)
    assert leader.try_acquire_or_renew(), "the leader renews as the API server returns"
    assert not standby.try_acquire_or_renew(), "the standby took over a leader that renewed"


def test_killing_the_leading_operator_hands_over_within_30_seconds(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, zis("before", autoscaling={"mode": "none"}, replicas=1))
    wait_ready(api, namespace, "before")
    old = leader_identity(api)
    killed = time.monotonic()
    kill_leader(operator, api)

    # A new service and a change to an existing one, made while nobody leads.
    apply(cluster, namespace, zis("after", autoscaling={"mode": "none"}, replicas=1))
    apply(cluster, namespace, zis("before", autoscaling={"mode": "none"}, replicas=2))
    wait_ready(api, namespace, "after", timeout=30)
    apps = client.AppsV1Api(api)
    wait_for(
        lambda: apps.read_namespaced_deployment("before", namespace).spec.replicas == 2, 30, "the scale-up"
    )
    took = time.monotonic() - killed
    print(f"the standby reconciled both {took:.1f}s after the leader was killed")
    assert took < 30
    assert leader_identity(api) != old, (
        "another process leads (the other replica, or the killed one's restart)"
    )
    # Ready means serving (one replica is enough); the second replica comes after it.
    wait_ready(api, namespace, "before", timeout=30)
    wait_for(
        lambda: (get(api, namespace, "before").get("status") or {}).get("readyReplicas") == 2,
        60,
        "both replicas of the scaled-up service to be ready",
    )


def test_a_second_copy_with_other_settings_stands_by_and_writes_nothing(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, tmp_path: Path
) -> None:
    leading_process(operator, api)
    (health,) = free_ports(1)
    log = tmp_path / "second.log"
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "POD_NAME": "second-copy",
        "POD_NAMESPACE": OPERATOR_NAMESPACE,
        "ZIMAGE_OPERATOR_HEALTH_HOST": "127.0.0.1",
        "ZIMAGE_OPERATOR_HEALTH_PORT": str(health),
    }
    command = [sys.executable, "-m", "zimage_operator", "--resync-seconds", "1", "--autoscale-seconds", "0.5"]
    with log.open("wb") as out:
        second = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for(lambda: "standing by" in log.read_text(), 30, "the second copy to stand by")
        answer = wait_for(lambda: _get(f"http://127.0.0.1:{health}/healthz"), 10, "its /healthz")
        assert answer.status_code == 200
        assert "standing by" in answer.text
        time.sleep(5)
        metrics = httpx.get(f"http://127.0.0.1:{health}/metrics").text
        assert re.search(r"^zimage_operator_leader 0\.0$", metrics, re.M)
        assert not re.search(r"^zimage_operator_writes_total\{", metrics, re.M), "a standby wrote"
        assert not (leader_pod(api) or "").startswith("second-copy")
    finally:
        second.send_signal(signal.SIGTERM)
        code = second.wait(timeout=15)
    assert code == 0, log.read_text()[-2000:]


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
