"""The local cluster's real node: a kubelet runs pods in runc containers, runs their probes and
restarts them, inside a network namespace with no route out."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
import yaml

from . import node_host
from .local_cluster import LocalCluster
from .pod_runner import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.kubelet]


def _pod(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    pod: dict[str, Any] = json.loads(
        cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout
    )
    return pod


def _create_namespace(cluster: LocalCluster, name: str) -> None:
    cluster.kubectl("create", "namespace", name)


def test_the_kubelet_node_offers_gpus_from_its_own_address(node_cluster: LocalCluster) -> None:
    node = json.loads(node_cluster.kubectl("get", "node", "node-0", "-o", "json").stdout)
    addresses = {a["type"]: a["address"] for a in node["status"]["addresses"]}
    assert addresses["InternalIP"] == node_host.NODE_IP
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"


def test_the_namespace_has_no_route_out(node_cluster: LocalCluster) -> None:
    assert node_cluster.netns is not None
    routes = node_cluster.netns.routes()
    assert not [r for r in routes if r.startswith("default")], routes
    inside = [ipaddress.IPv4Network(node_host.NODE_SUBNET), ipaddress.IPv4Network(node_host.SERVICE_CIDR)]
    for route in routes:
        target = route.split()[0]
        if target in ("local", "broadcast", "multicast", "anycast", "unreachable", "fe80::/64", "ff00::/8"):
            continue
        network = ipaddress.ip_network(target, strict=False)
        if isinstance(network, ipaddress.IPv4Network):
            assert any(network.subnet_of(net) for net in inside), route
        else:
            assert network.is_link_local, route


def test_a_gpu_pod_runs_in_a_container_with_an_address_on_the_bridge(node_cluster: LocalCluster) -> None:
    _create_namespace(node_cluster, "gpu-pod")
    pod = node_host.pause_pod("gpu", "gpu-pod", resources={"limits": {"nvidia.com/gpu": "2"}})
    node_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))
    node_cluster.kubectl("wait", "-n", "gpu-pod", "--for=condition=Ready", "pod/gpu", "--timeout=60s")
    status = _pod(node_cluster, "gpu-pod", "gpu")
    assert status["spec"]["nodeName"] == "node-0"
    assert ipaddress.ip_address(status["status"]["podIP"]) in ipaddress.ip_network(node_host.NODE_SUBNET)
    assert status["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
    node_cluster.kubectl("delete", "namespace", "gpu-pod", "--wait=false")


def test_a_failing_liveness_probe_restarts_the_container(node_cluster: LocalCluster) -> None:
    """The kubelet, not a simulation, runs the probe and restarts the container."""
    _create_namespace(node_cluster, "liveness")
    probe = {"tcpSocket": {"port": 9}, "periodSeconds": 1, "failureThreshold": 1, "timeoutSeconds": 1}
    pod = node_host.pause_pod("dies", "liveness", livenessProbe=probe)
    node_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))

    def restarted() -> bool:
        statuses = _pod(node_cluster, "liveness", "dies")["status"].get("containerStatuses") or []
        return bool(statuses) and statuses[0]["restartCount"] >= 1

    wait_until(restarted, 90, "the kubelet to restart the container")
    events = node_cluster.kubectl("get", "events", "-n", "liveness", "-o", "json").stdout
    messages = [e["message"] for e in json.loads(events)["items"]]
    assert any("Liveness probe failed" in m for m in messages), messages
    node_cluster.kubectl("delete", "namespace", "liveness", "--wait=false")


def test_a_failing_readiness_probe_keeps_the_pod_unready(node_cluster: LocalCluster) -> None:
    _create_namespace(node_cluster, "readiness")
    probe = {"tcpSocket": {"port": 9}, "periodSeconds": 1}
    pod = node_host.pause_pod("unready", "readiness", readinessProbe=probe)
    node_cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(pod))

    def running() -> bool:
        return bool(_pod(node_cluster, "readiness", "unready")["status"].get("phase") == "Running")

    wait_until(running, 60, "the container to run")
    wait_until(
        lambda: _events_mention(node_cluster, "readiness", "Readiness probe failed"), 30, "a failed probe"
    )
    conditions = {
        c["type"]: c["status"] for c in _pod(node_cluster, "readiness", "unready")["status"]["conditions"]
    }
    assert conditions["ContainersReady"] == "False"
    assert conditions["Ready"] == "False"
    node_cluster.kubectl("delete", "namespace", "readiness", "--wait=false")


def _events_mention(cluster: LocalCluster, namespace: str, text: str) -> bool:
    events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    return any(text in str(e["message"]) for e in events)
