"""The server from the Dockerfile's image, run by the operator (itself in its container) on the
local cluster's kubelet node, in a namespace that enforces the restricted Pod Security
Standard. Everything here is Kubernetes' own: the kubelet runs the startup, readiness and
liveness probes, restarts the container, writes its termination message, runs the preStop
hook and sends SIGTERM; kube-proxy routes the Service. The tiny model runs on the CPU
(``resources.gpus: 0``); the VRAM figures come from the file source (``vram.source: file``),
the one part that stands in for a GPU."""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.local_cluster import LocalCluster
from tests.cluster.node_host import pause_pod
from tests.cluster.pod_runner import wait_until
from zimage_operator.builders import PRESTOP_SECONDS

from .support import KUBELET_NODE, kube_json

pytestmark = [pytest.mark.cluster, pytest.mark.kubelet, pytest.mark.slow]

NAMESPACE = "e2e-restricted"
NAME = "tiny"
API_KEY = f"sk-e2e-{secrets.token_hex(12)}"
SELECTOR = f"app.kubernetes.io/instance={NAME}"
VRAM_FILE = "/tmp/zimage-vram.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _service_manifest(image: str) -> dict[str, Any]:
    return {
        "apiVersion": "zimage.dev/v1alpha1",
        "kind": "ZImageService",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "model": {"source": "builtin://tiny"},
            "runtime": {
                "image": image,
                "imagePullPolicy": "Never",
                "compile": False,
                "warmupSizes": ["256x256"],
                "maxBatchSize": 2,
                "requestTimeoutSeconds": 90,
            },
            "resources": {"gpus": 0, "cpu": "500m", "memory": "3Gi"},
            # 15 s of failures before a restart: the kubelet probes liveness on a container it has
            # just restarted while its startup probe still runs, and the refused connections
            # before the server listens (several seconds here) restarted it a second time with
            # 2 s x 2.
            "vram": {"source": "file", "limit": "1Gi", "periodSeconds": 3, "failureThreshold": 5},
            "autoscaling": {"mode": "none"},
            "replicas": 1,
            "scheduling": {"nodeSelector": KUBELET_NODE},
            "auth": {"apiKeySecretRef": {"name": "api-keys"}},
        },
    }


def _ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _pods(cluster: LocalCluster) -> list[dict[str, Any]]:
    pods = kube_json(cluster, "get", "pods", "-n", NAMESPACE, "-l", SELECTOR)["items"]
    return [pod for pod in pods if not pod["metadata"].get("deletionTimestamp")]


def _server_status(pod: dict[str, Any]) -> dict[str, Any]:
    (status,) = (pod.get("status") or {}).get("containerStatuses") or [{}]
    result: dict[str, Any] = status
    return result


def _service(cluster: LocalCluster) -> dict[str, Any]:
    result: dict[str, Any] = kube_json(cluster, "get", "zimageservice", NAME, "-n", NAMESPACE)
    return result


@pytest.fixture(scope="module")
def restricted(operator_release: LocalCluster, server_image: str) -> Iterator[LocalCluster]:
    """The namespace (restricted Pod Security, enforced), the API key Secret, and the
    ZImageService applied; the first test watches it come up."""
    cluster = operator_release
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": NAMESPACE,
            "labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            },
        },
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "api-keys", "namespace": NAMESPACE},
        "stringData": {"keys": f"{API_KEY}\n"},
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([namespace, secret]))
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(_service_manifest(server_image)))
    try:
        yield cluster
    finally:
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


@pytest.fixture(scope="module")
def endpoint(restricted: LocalCluster) -> str:
    """The ZImageService's Service, reached from host loopback through a relay to its ClusterIP."""
    service = kube_json(restricted, "get", "service", NAME, "-n", NAMESPACE)
    address = f"{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"
    port = restricted.relay(f"{NAMESPACE}-{NAME}", address)
    return f"http://127.0.0.1:{port}"


def test_the_service_is_ready_only_once_the_kubelet_probes_pass(restricted: LocalCluster) -> None:
    cluster = restricted
    running_unready = 0
    deadline = time.monotonic() + 600
    while True:
        service = _service(cluster)  # read before the pods: a Ready read here must hold below
        pods = _pods(cluster)
        if _ready(service):
            break
        for pod in pods:
            status = _server_status(pod)
            if "running" in (status.get("state") or {}) and not status.get("ready"):
                running_unready += 1
        assert time.monotonic() < deadline, f"not Ready within 600 s: {service.get('status')}"
        time.sleep(0.5)
    (pod,) = pods
    status = _server_status(pod)
    assert (status.get("started"), status.get("ready")) == (True, True), "Ready before the probes passed"
    assert status["restartCount"] == 0
    assert status["containerID"].startswith("containerd://")
    assert pod["spec"]["nodeName"] == "node-0"
    assert running_unready >= 2, "the server's container never ran unready: no probe held the service back"
    assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"]["requests"]

    # The restricted profile is enforced here: the operator's pod passed it, a privileged one does not.
    privileged = pause_pod("privileged", NAMESPACE, securityContext={"privileged": True})
    refused = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(privileged), check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr


def test_a_missing_api_key_secret_is_reported_from_the_kubelets_event(
    restricted: LocalCluster, server_image: str
) -> None:
    """The kubelet cannot mount a Secret that does not exist: the pod waits in ContainerCreating
    and only its FailedMount Event says why. The service says it within 15 s, and keeps saying it."""
    cluster = restricted
    manifest = _service_manifest(server_image)
    manifest["metadata"]["name"] = "nokeys"
    manifest["spec"]["auth"] = {"apiKeySecretRef": {"name": "no-such-secret"}}
    manifest["spec"]["resources"].update(cpu="100m", memory="1Gi")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest))
    try:

        def pod_created() -> bool:
            selector = "app.kubernetes.io/instance=nokeys"
            return bool(kube_json(cluster, "get", "pods", "-n", NAMESPACE, "-l", selector)["items"])

        wait_until(pod_created, 60, "the pod", interval=0.5)
        created = time.monotonic()

        def degraded() -> dict[str, Any]:
            body = kube_json(cluster, "get", "zimageservice", "nokeys", "-n", NAMESPACE)
            for item in (body.get("status") or {}).get("conditions") or []:
                bad = (item["type"], item["status"]) == ("Degraded", "True")
                if bad and "FailedMount" in item["message"]:
                    return dict(item)
            return {}

        found = wait_until(degraded, 45, "Degraded with the kubelet's FailedMount", interval=0.5)
        print(f"FailedMount shown {time.monotonic() - created:.1f}s after the pod was created")
        assert found["reason"] == "PodsFailing"
        assert 'secret "no-such-secret" not found' in found["message"], found
        time.sleep(20)  # past a resync and the kubelet's next mount attempt
        assert degraded().get("lastTransitionTime") == found["lastTransitionTime"], "it flapped"
    finally:
        cluster.kubectl("delete", "zimageservice", "nokeys", "-n", NAMESPACE, "--wait=false", check=False)


def test_api_keys_come_from_the_mounted_secret(restricted: LocalCluster, endpoint: str) -> None:
    wait_until(lambda: _ready(_service(restricted)), 600, "the service to be Ready", interval=1)
    body = {"prompt": "a red cube", "size": "256x256", "response_format": "b64_json"}
    anonymous = httpx.post(f"{endpoint}/v1/images/generations", json=body, timeout=60)
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.json()["error"]["message"]
    wrong = httpx.post(
        f"{endpoint}/v1/images/generations", json=body, headers={"Authorization": "Bearer sk-no"}, timeout=60
    )
    assert wrong.status_code == 401

    images = openai.OpenAI(base_url=f"{endpoint}/v1", api_key=API_KEY, max_retries=0).images.generate(
        prompt="a red cube", size="256x256", response_format="b64_json"
    )
    assert images.data is not None
    assert base64.b64decode(images.data[0].b64_json or "").startswith(PNG_MAGIC)


def test_vram_over_the_limit_restarts_the_container_and_the_operator_says_so(
    restricted: LocalCluster,
) -> None:
    cluster = restricted
    wait_until(lambda: _ready(_service(cluster)), 600, "the service to be Ready", interval=1)
    (pod,) = _pods(cluster)
    name = pod["metadata"]["name"]
    before = _server_status(pod)["restartCount"]
    figures = '{"process_bytes": 2147483648}'  # 2 GiB against the 1Gi limit
    write = f"echo '{figures}' > {VRAM_FILE}"
    cluster.kubectl("exec", "-n", NAMESPACE, name, "-c", "server", "--", "sh", "-c", write)

    def restarted() -> dict[str, Any]:
        (current,) = _pods(cluster)
        status = _server_status(current)
        return status if status.get("restartCount", 0) > before else {}

    status = wait_until(restarted, 180, "the kubelet to restart the server's container", interval=1)
    assert status["restartCount"] == before + 1
    terminated = status["lastState"]["terminated"]
    assert "zimage: VRAM limit exceeded (process)" in terminated["message"], terminated
    assert "limit 1.00 GiB" in terminated["message"], terminated
    # The kubelet stopped it with SIGTERM after liveness failed: the server drained and exited
    # cleanly, a restart for its VRAM rather than a crash.
    assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed"), terminated

    def probe_events(reason: str) -> list[str]:
        selector = f"involvedObject.name={name},reason={reason}"
        found = kube_json(cluster, "get", "events", "-n", NAMESPACE, "--field-selector", selector)["items"]
        return [event["message"] for event in found]

    unhealthy, killing = probe_events("Unhealthy"), probe_events("Killing")
    assert any(message.startswith("Liveness probe failed") for message in unhealthy), unhealthy
    assert any("failed liveness probe, will be restarted" in message for message in killing), killing

    def event() -> dict[str, Any]:
        events = kube_json(
            cluster,
            "get",
            "events",
            "-n",
            NAMESPACE,
            "--field-selector",
            f"involvedObject.name={NAME},reason=VramLimitRestart",
        )["items"]
        return events[0] if events else {}

    recorded = wait_until(event, 90, "the operator's VramLimitRestart event", interval=1)
    assert recorded["type"] == "Warning"
    assert name in recorded["message"]
    assert "VRAM limit exceeded" in recorded["message"]
    last = _service(cluster)["status"]["lastVramRestart"]
    assert (last["pod"], last["container"], last["restartCount"]) == (name, "server", before + 1)
    assert "VRAM limit exceeded" in last["message"]

    # The restarted server ignores the file it was restarted for (written before it started).
    def ready_again() -> bool:
        (current,) = _pods(cluster)
        return _server_status(current).get("ready") is True and _ready(_service(cluster))

    wait_until(ready_again, 300, "the restarted container and the service to be Ready again", interval=1)
    time.sleep(18)  # longer than liveness takes to restart (3 s x 5)
    (pod,) = _pods(cluster)
    assert pod["metadata"]["name"] == name, "the kubelet restarted the container, not a new pod"
    assert _server_status(pod)["restartCount"] == before + 1
    assert _server_status(pod)["ready"] is True


def _queued(endpoint: str) -> float:
    """Requests the server holds: waiting for the GPU or on it."""
    families = text_string_to_metric_families(httpx.get(f"{endpoint}/metrics", timeout=10).text)
    wanted = {"zimage_queue_depth", "zimage_in_flight_requests"}
    return sum(sample.value for family in families for sample in family.samples if sample.name in wanted)


class PodWatch:
    """Every state of one pod the API server reports until it is gone, and whether its address
    is still a ready endpoint of the Service, seen from a watch and a poll in threads."""

    def __init__(self, cluster: LocalCluster, name: str, address: str) -> None:
        from kubernetes import config

        self.api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        self.name, self.address = name, address
        self.terminated: dict[str, Any] = {}
        self.deletion: str | None = None
        self.grace: int | None = None
        self.left_endpoints: float | None = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch), threading.Thread(target=self._endpoints)]
        for thread in self._threads:
            thread.start()

    def _watch(self) -> None:
        from kubernetes import client, watch

        stream = watch.Watch().stream(
            client.CoreV1Api(self.api).list_namespaced_pod,
            NAMESPACE,
            field_selector=f"metadata.name={self.name}",
            timeout_seconds=240,
        )
        for event in stream:
            pod = event["object"]
            if pod.metadata.deletion_timestamp is not None:
                self.deletion = pod.metadata.deletion_timestamp.isoformat()
                self.grace = pod.metadata.deletion_grace_period_seconds
            for status in pod.status.container_statuses or []:
                if status.name == "server" and status.state.terminated is not None:
                    self.terminated = {
                        "exitCode": status.state.terminated.exit_code,
                        "finishedAt": status.state.terminated.finished_at.isoformat(),
                    }
            if event["type"] == "DELETED" or self._stop.is_set():
                return

    def _endpoints(self) -> None:
        from kubernetes import client

        discovery = client.DiscoveryV1Api(self.api)
        while not self._stop.is_set():
            slices = discovery.list_namespaced_endpoint_slice(
                NAMESPACE, label_selector=f"kubernetes.io/service-name={NAME}"
            ).items
            ready = {
                address
                for piece in slices
                for endpoint in piece.endpoints or []
                if endpoint.conditions is not None and endpoint.conditions.ready
                for address in endpoint.addresses
            }
            if self.address not in ready and self.left_endpoints is None:
                self.left_endpoints = time.monotonic()
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(240)


def test_deleting_a_pod_drains_it_rather_than_killing_it(restricted: LocalCluster, endpoint: str) -> None:
    """preStop, SIGTERM and the grace period as the operator renders them, run by the kubelet.
    A drain, not a kill: the pod leaves the Service's ready endpoints, requests arriving at the
    pod afterwards get 503 ``draining`` while those it accepted finish and are answered, and
    the container exits 0 well before its grace period ends."""
    cluster = restricted
    wait_until(lambda: _ready(_service(cluster)), 600, "the service to be Ready", interval=1)
    (pod,) = _pods(cluster)
    pod_port = cluster.relay(f"{NAMESPACE}-{pod['metadata']['name']}", f"{pod['status']['podIP']}:8000")
    direct = f"http://127.0.0.1:{pod_port}"
    images = openai.OpenAI(base_url=f"{endpoint}/v1", api_key=API_KEY, max_retries=0, timeout=120).images
    results: dict[int, Any] = {}
    finished: dict[int, float] = {}

    def generate(seed: int) -> None:
        try:
            results[seed] = images.generate(
                prompt=f"a lighthouse {seed}",
                size="1024x1024",
                response_format="b64_json",
                extra_body={"seed": seed, "num_inference_steps": 50},
            )
        except Exception as exc:  # the assertion below reports it
            results[seed] = exc
        finished[seed] = time.monotonic()

    seeds = range(8)
    clients = [threading.Thread(target=generate, args=(seed,)) for seed in seeds]
    for thread in clients:
        thread.start()
    wait_until(lambda: _queued(endpoint) >= 6, 60, "the server to accept the requests", interval=0.2)
    watched = PodWatch(cluster, pod["metadata"]["name"], pod["status"]["podIP"])
    deleted = time.monotonic()
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, pod["metadata"]["name"], "--wait=false")

    # After the preStop pause the server has its SIGTERM: a request reaching the pod then is
    # refused in the OpenAI shape, while the accepted ones still run.
    refused: dict[str, Any] = {}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": "late", "size": "256x256", "response_format": "b64_json"}
    time.sleep(max(0.0, deleted + PRESTOP_SECONDS + 0.5 - time.monotonic()))
    while not refused and time.monotonic() - deleted < 60:
        try:
            answer = httpx.post(f"{direct}/v1/images/generations", json=body, headers=headers, timeout=5)
        except httpx.TimeoutException:
            continue  # accepted, not refused: still in its preStop pause
        except httpx.HTTPError:
            break  # the server is gone: nothing was refused in time, which the assertion reports
        if answer.status_code == 503:
            refused = {"at": time.monotonic(), **answer.json()["error"]}
        time.sleep(0.25)
    for thread in clients:
        thread.join(180)
    watched.stop()

    failures = {seed: r for seed, r in results.items() if isinstance(r, Exception)}
    assert not failures, failures
    assert sorted(results) == list(seeds)
    for result in results.values():
        assert base64.b64decode(result.data[0].b64_json).startswith(PNG_MAGIC)
    assert refused, "no new request was refused while the pod drained"
    assert refused["code"] == "draining", refused
    assert refused["at"] < max(finished.values()), "the refusal came after the accepted requests ended"
    print(
        f"left the endpoints {watched.left_endpoints - deleted:.1f}s after the delete; refused "
        f"{refused['at'] - deleted:.1f}s after; last answer {max(finished.values()) - deleted:.1f}s after"
        if watched.left_endpoints is not None
        else "never left the endpoints"
    )
    assert watched.left_endpoints is not None, "the pod stayed a ready endpoint of the Service"
    assert watched.left_endpoints < refused["at"], "the pod left the endpoints only after refusing"
    assert watched.terminated, "the container's end was not seen"
    assert watched.terminated["exitCode"] == 0, watched.terminated
    assert watched.deletion is not None
    # The deletion timestamp is when the grace period ends: the server was done well before it.
    assert watched.terminated["finishedAt"] < watched.deletion, (watched.terminated, watched.deletion)
    wait_until(lambda: _ready(_service(cluster)), 600, "a new pod to serve", interval=1)
    (replacement,) = _pods(cluster)
    assert replacement["metadata"]["name"] != pod["metadata"]["name"]
