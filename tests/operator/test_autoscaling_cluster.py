"""End to end: real tiny-model servers behind simulated GPU pods, a bounded load on loopback,
and the built-in autoscaler scaling the ZImageService up and back down."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from kubernetes import client

from tests.cluster.fixtures import kill_leader
from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import LocalPodRunner

from .test_operator_cluster import apply, get, wait_for, zis

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BODY = {"prompt": "a crowd of foxes", "size": "512x512", "num_inference_steps": 20}
MAX_REQUESTS = 1500
MAX_SECONDS = 240.0


def serving_urls(api: client.ApiClient, namespace: str) -> list[str]:
    pods = client.CoreV1Api(api).list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/instance=busy"
    )
    urls = []
    for pod in pods.items:
        if pod.metadata.deletion_timestamp or not pod.status.pod_ip:
            continue
        url = f"http://{pod.status.pod_ip}:8000"
        try:  # ready as the kubelet sees it: on the server's health port
            if httpx.get(f"http://{pod.status.pod_ip}:8001/healthz/ready", timeout=1).status_code == 200:
                urls.append(url)
        except httpx.TransportError:
            continue
    return urls


class LoadGenerator:
    """Clients on loopback, bounded in count and time; each request goes to a serving pod."""

    def __init__(self, api: client.ApiClient, namespace: str, clients: int) -> None:
        self.api, self.namespace = api, namespace
        self.stop = threading.Event()
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.urls: list[str] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        self._refresher = threading.Thread(target=self._refresh)
        self.started = time.monotonic()

    def __enter__(self) -> LoadGenerator:
        self._refresher.start()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in [*self._threads, self._refresher]:
            thread.join(timeout=120)

    def _refresh(self) -> None:
        while not self.stop.is_set():
            self.urls = serving_urls(self.api, self.namespace)
            self.stop.wait(1.0)

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set() and time.monotonic() - self.started < MAX_SECONDS:
                urls = self.urls
                if not urls:
                    time.sleep(0.2)
                    continue
                with self._lock:
                    if self.sent >= MAX_REQUESTS:
                        return
                    self.sent += 1
                    number = self.sent
                try:
                    status = http.post(
                        f"{urls[(number + index) % len(urls)]}/generate", json=BODY
                    ).status_code
                except httpx.TransportError:
                    status = 0
                with self._lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1


def replicas(api: client.ApiClient, namespace: str) -> int:
    return int(client.AppsV1Api(api).read_namespaced_deployment("busy", namespace).spec.replicas)


def images_generated(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=2).text.splitlines():
        if line.startswith("zimage_images_generated_total "):
            return float(line.split()[1])
    return 0.0


# Longer than a failover (the Lease's 15 s and the new leader's start), so that a new leader
# that forgot the window would scale down inside it.
WINDOW_SECONDS = 40


def test_the_builtin_autoscaler_follows_the_load(
    operator: LocalPodRunner,
    pod_runner: LocalPodRunner,
    cluster: LocalCluster,
    api: client.ApiClient,
    namespace: str,
) -> None:
    spec: dict[str, Any] = {
        "model": {"source": "builtin://tiny"},
        "runtime": {
            "image": "registry.local/zimage-server:dev",
            "warmupSizes": ["256x256"],
            "maxBatchSize": 1,
        },
        "autoscaling": {
            "mode": "builtin",
            "minReplicas": 1,
            "maxReplicas": 4,
            "targetQueuePerReplica": 2,
            "scaleDownStabilizationSeconds": WINDOW_SECONDS,
        },
    }
    apply(cluster, namespace, zis("busy", **spec))
    wait_for(lambda: serving_urls(api, namespace), 120, "the first server")
    assert replicas(api, namespace) == 1
    first = serving_urls(api, namespace)[0]

    with LoadGenerator(api, namespace, clients=8) as load:
        wait_for(lambda: replicas(api, namespace) >= 3, 60, "a scale-up to 3 or more replicas")
        scaled_after = time.monotonic() - load.started
        wait_for(lambda: len(serving_urls(api, namespace)) >= 3, 120, "three serving pods")
        newcomers = [url for url in serving_urls(api, namespace) if url != first]
        wait_for(
            lambda: all(images_generated(url) > 0 for url in newcomers), 60, "the new pods to take traffic"
        )
    print(f"scaled to {replicas(api, namespace)} replicas {scaled_after:.1f}s after the load began")
    print(f"requests: {load.sent}, statuses: {load.statuses}")
    assert load.statuses == {200: load.sent}, "every request was answered"

    # The leading operator is killed as the load stops: the replica that takes over continues
    # the scale-down window from the status, so nothing scales down inside the window.
    calm = time.monotonic()
    peak = replicas(api, namespace)
    before = kill_leader(operator, api)
    wait_for(lambda: replicas(api, namespace) < peak, 90, "the first scale-down")
    first_down = time.monotonic() - calm
    print(f"first scale-down {first_down:.1f}s after the load stopped (another operator took over meanwhile)")
    assert before not in operator.pids()
    # The window runs from the last high recommendation, up to a pass (2 s) before the load
    # stopped; one that forgot it would scale down at its first pass, about 20 s in.
    assert first_down >= WINDOW_SECONDS - 5, "the operator that took over scaled down inside the window"
    wait_for(lambda: replicas(api, namespace) == 1, 90, "the scale-down to the minimum")
    print(f"back to 1 replica {time.monotonic() - calm:.1f}s after the load stopped")

    status = get(api, namespace, "busy")["status"]["autoscaling"]
    assert status["desiredReplicas"] == 1
    assert status["lastScaleTime"]
    events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
    reasons = [e["reason"] for e in events if e["involvedObject"]["name"] == "busy"]
    assert "ScaledUp" in reasons
    assert "ScaledDown" in reasons
