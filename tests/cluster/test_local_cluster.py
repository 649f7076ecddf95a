"""The local control plane behaves like Kubernetes where the operator will rely on it."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from . import local_cluster, node_host
from .local_cluster import GPU_PRODUCT, SERVICE_CIDR, LocalCluster, processes_under
from .pod_runner import LocalPodRunner, wait_until

pytestmark = pytest.mark.cluster


def _deployment(
    name: str, image: str = "registry.local/sleeper:1", env: dict[str, str] | None = None
) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "main",
                            "image": image,
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ]
                },
            },
        },
    }


def _wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def _ready_pods(core: client.CoreV1Api, namespace: str, app: str, count: int) -> list[Any]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"app={app}").items
    ready = [
        p
        for p in pods
        if p.status.phase == "Running"
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]
    return ready if len(ready) == count else []


def test_simulated_nodes_offer_gpus(api: client.ApiClient) -> None:
    nodes = client.CoreV1Api(api).list_node().items
    assert len(nodes) == 2
    for node in nodes:
        assert node.status.allocatable["nvidia.com/gpu"] == "8"
        assert node.metadata.labels["nvidia.com/gpu.product"] == GPU_PRODUCT
        assert ipaddress.ip_address(node.status.addresses[0].address).is_loopback


def test_a_gpu_deployment_gets_running_ready_pods_with_loopback_ips(
    api: client.ApiClient, namespace: str, cluster: LocalCluster
) -> None:
    client.AppsV1Api(api).create_namespaced_deployment(namespace, _deployment("gpu"))
    core = client.CoreV1Api(api)
    pods = _wait_for(lambda: _ready_pods(core, namespace, "gpu", 2), 60, "two Ready pods")
    for pod in pods:
        assert pod.spec.node_name.startswith("gpu-node-")
        assert ipaddress.ip_address(pod.status.pod_ip) in ipaddress.ip_network(cluster.pod_cidr)
        assert ipaddress.ip_address(pod.status.host_ip).is_loopback
    assert len({pod.status.pod_ip for pod in pods}) == 2


def test_a_pod_asking_for_more_gpus_than_a_node_has_stays_pending(
    api: client.ApiClient, namespace: str
) -> None:
    manifest = _deployment("greedy")
    manifest["spec"]["replicas"] = 1
    manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "9"
    client.AppsV1Api(api).create_namespaced_deployment(namespace, manifest)
    core = client.CoreV1Api(api)

    def unschedulable() -> bool:
        pods = core.list_namespaced_pod(namespace, label_selector="app=greedy").items
        return any(
            c.type == "PodScheduled" and c.reason == "Unschedulable"
            for p in pods
            for c in p.status.conditions or []
        )

    _wait_for(unschedulable, 60, "the scheduler to refuse the pod")


def test_a_pod_marked_not_ready_by_the_node_controller_is_ready_again_as_a_kubelet_reports_it(
    api: client.ApiClient, namespace: str
) -> None:
    """After an API server outage the node lifecycle controller marks the pods of nodes whose
    heartbeats it missed not ready; a kubelet reports them ready again, and so does kwok. A pod
    whose container is not ready (a crash loop reported by a test) stays not ready."""
    manifest = _deployment("marked")
    manifest["spec"]["replicas"] = 1
    client.AppsV1Api(api).create_namespaced_deployment(namespace, manifest)
    core = client.CoreV1Api(api)
    (pod,) = _wait_for(lambda: _ready_pods(core, namespace, "marked", 1), 60, "a Ready pod")
    name = pod.metadata.name

    def ready() -> str:
        found = core.read_namespaced_pod_status(name, namespace).status.conditions
        return str(next(c.status for c in found if c.type == "Ready"))

    # What MarkPodsNotReady writes: the Ready condition alone.
    core.patch_namespaced_pod_status(
        name, namespace, {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    )
    _wait_for(lambda: ready() == "True", 15, "the pod to be reported ready again")

    container = {
        "name": "main",
        "image": pod.spec.containers[0].image,
        "imageID": "",
        "ready": False,
        "restartCount": 1,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
    }
    status = {"conditions": [{"type": "Ready", "status": "False"}], "containerStatuses": [container]}
    core.patch_namespaced_pod_status(name, namespace, {"status": status})
    time.sleep(3)
    assert ready() == "False", "a pod whose container is not ready was reported ready"


def test_deleting_the_owner_garbage_collects_its_children(api: client.ApiClient, namespace: str) -> None:
    apps = client.AppsV1Api(api)
    core = client.CoreV1Api(api)
    apps.create_namespaced_deployment(namespace, _deployment("owned"))
    _wait_for(lambda: _ready_pods(core, namespace, "owned", 2), 60, "pods")
    assert apps.list_namespaced_replica_set(namespace, label_selector="app=owned").items
    apps.delete_namespaced_deployment("owned", namespace, propagation_policy="Background")
    _wait_for(
        lambda: (
            not apps.list_namespaced_replica_set(namespace, label_selector="app=owned").items
            and not core.list_namespaced_pod(namespace, label_selector="app=owned").items
        ),
        60,
        "the ReplicaSet and pods to be collected",
    )


def test_a_namespace_deletion_completes(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="doomed")))
    core.create_namespaced_config_map("doomed", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c")))
    client.AppsV1Api(api).create_namespaced_deployment("doomed", _deployment("d"))
    _wait_for(lambda: _ready_pods(core, "doomed", "d", 2), 60, "pods")
    core.delete_namespace("doomed")

    def gone() -> bool:
        try:
            core.read_namespace("doomed")
        except ApiException as exc:
            return bool(exc.status == 404)
        return False

    _wait_for(gone, 90, "the namespace to finish deleting")


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.zimage.dev"},
    "spec": {
        "group": "test.zimage.dev",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 1},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.minReplicas <= self.maxReplicas",
                                        "message": "minReplicas must not exceed maxReplicas",
                                    }
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def test_a_crd_cel_rule_refuses_a_violating_object(api: client.ApiClient, namespace: str) -> None:
    extensions = client.ApiextensionsV1Api(api)
    extensions.create_custom_resource_definition(CRD)
    try:
        custom = client.CustomObjectsApi(api)

        def established() -> bool:
            crd = extensions.read_custom_resource_definition("widgets.test.zimage.dev")
            return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

        _wait_for(established, 30, "the CRD to be established")

        def widget(name: str, low: int, high: int) -> dict[str, Any]:
            return {
                "apiVersion": "test.zimage.dev/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": {"minReplicas": low, "maxReplicas": high},
            }

        args = ("test.zimage.dev", "v1", namespace, "widgets")
        _wait_for(lambda: _creates(custom, args, widget("fine", 1, 3)), 30, "the new resource to be served")
        with pytest.raises(ApiException) as refused:
            custom.create_namespaced_custom_object(*args, widget("bad", 5, 2))
        assert refused.value.status == 422
        assert "minReplicas must not exceed maxReplicas" in json.loads(refused.value.body)["message"]
    finally:
        extensions.delete_custom_resource_definition("widgets.test.zimage.dev")


def _creates(custom: client.CustomObjectsApi, args: tuple[str, ...], body: dict[str, Any]) -> bool:
    try:
        custom.create_namespaced_custom_object(*args, body)
    except ApiException as exc:
        if exc.status == 404:  # discovery has not caught up yet
            return False
        raise
    return True


def test_service_cluster_ips_are_on_loopback(api: client.ApiClient, namespace: str) -> None:
    service = client.CoreV1Api(api).create_namespaced_service(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8000}]},
        },
    )
    assert ipaddress.ip_address(service.spec.cluster_ip) in ipaddress.ip_network(SERVICE_CIDR)


def test_kubectl_from_the_cache_talks_to_the_cluster(cluster: LocalCluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"
    assert version["clientVersion"]["gitVersion"] == "v1.36.3"
    nodes = cluster.kubectl("get", "nodes", "-o", "name").stdout.split()
    assert nodes == ["node/gpu-node-0", "node/gpu-node-1"]


def test_helm_from_the_cache_installs_a_chart(cluster: LocalCluster, namespace: str, tmp_path: Path) -> None:
    chart = tmp_path / "hello"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        yaml.safe_dump({"apiVersion": "v2", "name": "hello", "version": "0.1.0", "kubeVersion": ">=1.30.0-0"})
    )
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-greeting\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    (chart / "values.yaml").write_text("greeting: hello\n")

    def helm(*args: str) -> subprocess.CompletedProcess[str]:
        return cluster.helm(tmp_path, *args, namespace=namespace, timeout=120)

    installed = helm("install", "demo", str(chart), "--set", "greeting=hi", "--wait")
    assert installed.returncode == 0, installed.stderr
    releases = json.loads(helm("list", "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]
    data = json.loads(
        cluster.kubectl("get", "configmap", "demo-greeting", "-n", namespace, "-o", "json").stdout
    )
    assert data["data"] == {"greeting": "hi"}
    assert helm("uninstall", "demo", "--wait").returncode == 0
    assert cluster.kubectl("get", "configmap", "demo-greeting", "-n", namespace, check=False).returncode != 0


@pytest.mark.slow
def test_the_pod_runner_serves_behind_simulated_pods(
    api: client.ApiClient, namespace: str, pod_runner: LocalPodRunner
) -> None:
    env = {"ZIMAGE_WARMUP_SIZES": "256x256", "ZIMAGE_MIN_SIZE": "64"}
    manifest = _deployment("zimage", image="registry.example/team/zimage-server:dev", env=env)
    client.AppsV1Api(api).create_namespaced_deployment(namespace, manifest)
    core = client.CoreV1Api(api)
    pods = _wait_for(lambda: _ready_pods(core, namespace, "zimage", 2), 60, "pods")
    urls = [f"http://{pod.status.pod_ip}:8000" for pod in pods]

    def serving(url: str) -> bool:
        try:
            return httpx.get(f"{url}/healthz/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    for url in urls:
        wait_until(lambda url=url: serving(url), 120, f"the server at {url}")  # type: ignore[misc]
        image = httpx.post(f"{url}/generate", json={"prompt": "a fox", "size": "128x128"}, timeout=60)
        assert image.status_code == 200
        assert image.content.startswith(b"\x89PNG")
    pids = pod_runner.pids()
    assert len(pids) == 2

    client.AppsV1Api(api).delete_namespaced_deployment("zimage", namespace, propagation_policy="Foreground")
    wait_until(lambda: not pod_runner.pids(), 60, "the runner to stop the processes")
    for url in urls:
        assert not serving(url)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.kubelet
def test_clusters_side_by_side_claim_different_pod_addresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_cluster, "CLAIMS", tmp_path / "claims")
    first, second, third = (tmp_path / name for name in ("a", "b", "c"))
    for folder in (first, second, third):
        folder.mkdir()
        (folder / "state.json").write_text("{}")
    a, b = local_cluster.claim_pod_cidr(first), local_cluster.claim_pod_cidr(second)
    assert a != b
    assert ipaddress.ip_network(a).subnet_of(ipaddress.ip_network(local_cluster.POD_CIDRS))  # type: ignore[arg-type]
    local_cluster.release_pod_cidr(first)
    assert local_cluster.claim_pod_cidr(third) == a, "a released /16 is claimed again"
    # A claim whose cluster folder is gone is taken over.
    shutil.rmtree(second)
    assert local_cluster.claim_pod_cidr(first) == b


def test_cluster_up_and_down_start_quickly_and_leave_nothing_behind(tmp_path: Path) -> None:
    """`make cluster-up` / `make cluster-down`: the processes outlive `up`, a pod runs on the
    kubelet node, and `down` leaves no process, mount, cgroup, namespace or runtime state."""
    workdir = tmp_path / "second"
    command = [sys.executable, "-m", "tests.cluster.local_cluster"]
    root = Path(__file__).resolve().parents[2]
    runtime_dir_before = Path("/run/containerd").exists()
    up = subprocess.run(
        [*command, "up", "--dir", str(workdir)], capture_output=True, text=True, timeout=180, cwd=root
    )
    try:
        assert up.returncode == 0, up.stderr
        seconds = float(re.search(r"cluster up in ([\d.]+)s", up.stdout).group(1))  # type: ignore[union-attr]
        print(f"local cluster up in {seconds:.1f}s")
        assert seconds < 30
        state = json.loads((workdir / "state.json").read_text())
        names = sorted(c["name"] for c in state["components"])
        assert names == [
            "apiserver-relay",
            "containerd-node-0",
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-proxy-node-0",
            "kube-scheduler",
            "kubelet-node-0",
            "kwok",
        ]
        pids = [c["pid"] for c in state["components"]]
        assert all(Path(f"/proc/{pid}").exists() for pid in pids), "the cluster outlives the `up` command"
        kubeconfig = workdir / "admin.kubeconfig"
        nodes = subprocess.run(
            [
                str(Path(state["binaries"]) / "kubectl"),
                f"--kubeconfig={kubeconfig}",
                "get",
                "nodes",
                "-o",
                "name",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert nodes.stdout.split() == ["node/gpu-node-0", "node/gpu-node-1", "node/node-0"]
        cluster = LocalCluster.from_state(workdir)
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(node_host.pause_pod("p")))
        cluster.kubectl("wait", "--for=condition=Ready", "pod/p", "--timeout=60s")
        assert cluster.crictl("node-0", "pods", "-q").stdout.split(), "the pod has a sandbox on the node"
        assert node_host.mounts_under(str(workdir)), "its container's root file system is mounted"
    finally:
        down = subprocess.run(
            [*command, "down", "--dir", str(workdir)], capture_output=True, text=True, timeout=60, cwd=root
        )
    assert down.returncode == 0, down.stderr
    assert processes_under(str(workdir)) == []
    assert not (workdir / "state.json").exists()
    left = LocalCluster(workdir=workdir, binaries=Path(), kubelet_nodes=1)
    assert left.leftovers() == []
    if not runtime_dir_before:
        assert not Path("/run/containerd").exists(), list(Path("/run/containerd").rglob("*"))


def test_a_killed_runs_node_images_are_reclaimed_and_a_live_ones_are_not(tmp_path: Path) -> None:
    """A run killed before its teardown leaves a node's image store (about 10 GB with the server
    image) in a folder pytest keeps; the next kubelet cluster removes it, but never the store of
    a node whose processes still run, nor its own."""
    base = tmp_path / "pytest-of-someone"

    def node(session: str) -> Path:
        root = base / session / "node-cluster0" / "nodes" / "node-0" / "containerd" / "root"
        (root / "io.containerd.content.v1.content").mkdir(parents=True)
        return root

    abandoned, live, own = node("pytest-1"), node("pytest-2"), node("pytest-3")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", str(live.parents[1] / "containerd/config.toml")]
    )
    try:
        removed = local_cluster.reclaim_abandoned_nodes(base / "pytest-3" / "node-cluster0")
    finally:
        holder.kill()
        holder.wait()
    assert removed == [abandoned]
    assert not abandoned.exists()
    assert live.is_dir()
    assert own.is_dir()
    # Outside pytest's folders (a demo's --dir, say) nothing is searched.
    assert local_cluster.reclaim_abandoned_nodes(tmp_path / "elsewhere" / "cluster") == []
