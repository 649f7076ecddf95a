"""The operator, installed from deploy/ and run under its own service account, against the
real local control plane."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster.fixtures import kill_leader, leading_process
from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import LocalPodRunner

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "zimage.dev", "v1alpha1", "zimageservices"
SA = "system:serviceaccount:zimage-system:zimage-operator"


def zis(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ZImageService",
        "metadata": {"name": name},
        "spec": spec,
    }


def apply(cluster: LocalCluster, namespace: str, *docs: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs), check=False)


def service_address(pod_runner: LocalPodRunner, namespace: str, name: str, timeout: float = 180) -> str:
    """HOST:PORT of a ready server behind the service ``name``'s Service, as the pod runner
    routes it (no kube-proxy here: its selector and target port, resolved as the kubelet's
    service links are)."""
    prefix = name.upper().replace("-", "_")

    def serving() -> str | None:
        links = pod_runner.service_links(namespace)
        if f"{prefix}_SERVICE_HOST" not in links:
            return None
        host, port = links[f"{prefix}_SERVICE_HOST"], links[f"{prefix}_SERVICE_PORT"]
        try:
            ready = httpx.get(f"http://{host}:8001/healthz/ready", timeout=1)
        except httpx.TransportError:
            return None
        return f"{host}:{port}" if ready.status_code == 200 else None

    address: str = wait_for(serving, timeout, "a ready server behind the Service")
    return address


def get(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return result


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in (body.get("status") or {}).get("conditions") or []:
        if item["type"] == kind:
            return dict(item)
    return {}


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except ApiException as exc:
            if exc.status != 404:
                raise
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def wait_ready(api: client.ApiClient, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        body = get(api, namespace, name)
        status = body.get("status") or {}
        ok = condition(body, "Ready").get("status") == "True"
        current = status.get("observedGeneration") == body["metadata"]["generation"]
        return body if ok and current else None

    result: dict[str, Any] = wait_for(ready, timeout, f"{namespace}/{name} to be Ready")
    return result


def wait_settled(api: client.ApiClient, namespace: str, name: str) -> None:
    """Ready and rolled out: nothing is left to write. The service holds no finalizer, so it
    never waits for the operator to go."""
    wait_ready(api, namespace, name)
    wait_for(
        lambda: condition(get(api, namespace, name), "Progressing").get("status") == "False", 60, "rollout"
    )
    assert not get(api, namespace, name)["metadata"].get("finalizers")


def versions(api: client.ApiClient, namespace: str, name: str) -> dict[str, str]:
    apps, core, policy = client.AppsV1Api(api), client.CoreV1Api(api), client.PolicyV1Api(api)
    return {
        "zis": get(api, namespace, name)["metadata"]["resourceVersion"],
        "deployment": apps.read_namespaced_deployment(name, namespace).metadata.resource_version,
        "service": core.read_namespaced_service(name, namespace).metadata.resource_version,
        "pdb": policy.read_namespaced_pod_disruption_budget(name, namespace).metadata.resource_version,
    }


def test_the_minimal_example_becomes_a_ready_gpu_service(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "deploy/examples/minimal.yaml"))
    body = wait_ready(api, namespace, "posters")

    deployment = client.AppsV1Api(api).read_namespaced_deployment("posters", namespace)
    main = deployment.spec.template.spec.containers[0]
    assert main.resources.limits["nvidia.com/gpu"] == "1"
    assert main.startup_probe.http_get.path == "/healthz/startup"
    assert main.readiness_probe.http_get.path == "/healthz/ready"
    assert (main.liveness_probe.http_get.path, main.liveness_probe.period_seconds) == ("/healthz/live", 10)
    assert main.liveness_probe.failure_threshold == 3
    probes = (main.startup_probe, main.readiness_probe, main.liveness_probe)
    assert {probe.http_get.port for probe in probes} == {"health"}  # served in test_autoscaling_cluster
    assert main.lifecycle.pre_stop.sleep.seconds == 5
    assert deployment.spec.template.spec.termination_grace_period_seconds > 120
    env = {e.name: e.value for e in main.env}
    assert (env["ZIMAGE_VRAM_LIMIT"], env["ZIMAGE_VRAM_SCOPE"]) == ("90%", "process")
    assert deployment.metadata.owner_references[0].kind == "ZImageService"
    service = client.CoreV1Api(api).read_namespaced_service("posters", namespace)
    assert service.spec.ports[0].name == "http"
    assert service.spec.ports[0].port == 80
    pdb = client.PolicyV1Api(api).read_namespaced_pod_disruption_budget("posters", namespace)
    assert pdb.spec.max_unavailable == 1

    pods = client.CoreV1Api(api).list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/instance=posters"
    )
    assert [p.spec.node_name.startswith("gpu-node-") for p in pods.items] == [True]
    assert body["status"]["endpoint"] == f"http://posters.{namespace}.svc:80"
    assert body["status"]["readyReplicas"] == 1
    assert condition(body, "ModelReady")["reason"] == "NoCacheNeeded"

    table = cluster.kubectl("get", "zis", "-n", namespace).stdout.split("\n")
    assert table[0].split() == ["NAME", "READY", "REPLICAS", "MODEL", "AGE"]
    assert table[1].split()[:4] == ["posters", "True", "1", "hf://Tongyi-MAI/Z-Image-Turbo"]
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    reasons = {
        e["reason"] for e in json.loads(events)["items"] if e["involvedObject"]["kind"] == "ZImageService"
    }
    assert "Serving" in reasons


INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "min-above-max",
        {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
        "minReplicas must not exceed maxReplicas",
    ),
    ("vram-not-a-size", {"vram": {"limit": "lots"}}, "spec.vram.limit: Invalid value"),
    ("vram-over-100", {"vram": {"limit": "150%"}}, "at most 100%"),
    ("negative-gpus", {"resources": {"gpus": -1}}, "gpus must not be negative"),
    ("cpu-compiling", {"resources": {"gpus": 0}}, "set runtime.compile to false"),
    (
        "cpu-fp8",
        {"resources": {"gpus": 0}, "runtime": {"compile": False, "precision": "fp8"}},
        "runs the server on the CPU",
    ),
    (
        "artifacts-without-a-volume",
        {"runtime": {"compileArtifacts": {"enabled": True}}},
        "add model.cache (hf:// sources) or set runtime.compileArtifacts.claimName",
    ),
    (
        "artifacts-without-compile",
        {"runtime": {"compile": False, "compileArtifacts": {"enabled": True, "claimName": "k"}}},
        "keep runtime.compile true",
    ),
    ("bad-scheme", {"model": {"source": "s3://bucket/z"}}, "must be hf://OWNER/NAME[@REVISION]"),
    (
        "cache-on-builtin",
        {"model": {"source": "builtin://tiny", "cache": {}}},
        "cache applies only to hf:// sources",
    ),
    (
        "bad-precision",
        {"runtime": {"precision": "int4"}},
        'spec.runtime.precision: Unsupported value: "int4"',
    ),
    ("zero-batch", {"runtime": {"maxBatchSize": 0}}, "spec.runtime.maxBatchSize: Invalid value: 0"),
    ("port-too-big", {"service": {"port": 70000}}, "spec.service.port: Invalid value: 70000"),
    ("bad-warmup-size", {"runtime": {"warmupSizes": ["big"]}}, "spec.runtime.warmupSizes[0]"),
    (
        "bad-graph-part",
        {"runtime": {"cudaGraphs": ["vae"]}},
        'spec.runtime.cudaGraphs[0]: Unsupported value: "vae"',
    ),
    ("bad-mode", {"autoscaling": {"mode": "magic"}}, 'spec.autoscaling.mode: Unsupported value: "magic"'),
    ("typo", {"replica": 2}, 'unknown field "spec.replica"'),
    ("vram-zero", {"vram": {"limit": "0"}}, "a byte limit must be at least 1Gi"),
    (
        "bad-attention",
        {"runtime": {"attentionBackend": "magic"}},
        'spec.runtime.attentionBackend: Unsupported value: "magic"',
    ),
    ("tiny-warmup", {"runtime": {"warmupSizes": ["16x16"]}}, "spec.runtime.warmupSizes[0]"),
    (
        "lora-bad-source",
        {"loras": [{"name": "pixel", "source": "s3://bucket/pixel.safetensors"}]},
        "must be hf://OWNER/NAME[/FILE][@REVISION], pvc://CLAIM/PATH or file:///PATH",
    ),
    (
        "lora-twice",
        {"loras": [{"name": "pixel", "source": "hf://a/b"}, {"name": "pixel", "source": "hf://a/c"}]},
        'spec.loras[1]: Duplicate value: {"name":"pixel"}',
    ),
    (
        "lora-scale",
        {"loras": [{"name": "pixel", "source": "hf://a/b", "scale": 3}]},
        "spec.loras[0].scale in body should be less than or equal to 2",
    ),
    ("lora-model-name", {"loras": [{"name": "z-image-turbo", "source": "hf://a/b"}]}, "the model's own name"),
    ("lora-dotdot", {"loras": [{"name": "a", "source": "pvc://c/x/../y"}]}, "must not contain '..'"),
    (
        "odd-warmup",
        {"runtime": {"warmupSizes": ["1000x1000"]}},
        "each side a multiple of 16 from 256 to 2048",
    ),
    (
        "gpu-as-memory",
        {"resources": {"gpuResourceName": "memory"}},
        "must be a device plugin's extended resource",
    ),
    ("gpu-in-k8s-domain", {"resources": {"gpuResourceName": "kubernetes.io/gpu"}}, "outside kubernetes.io"),
    ("tiny-memory", {"resources": {"memory": "1"}}, "memory must be at least 1Gi"),
    ("nine-gpus", {"resources": {"gpus": 9}}, "gpus is at most 8, one node's GPUs"),
    (
        "sequence-parallel-beyond-the-gpus",
        {"resources": {"gpus": 2}, "parallelism": {"sequenceParallel": 4}},
        "set resources.gpus to the same number",
    ),
    (
        "sequence-parallel-on-the-cpu",
        {"resources": {"gpus": 0}, "runtime": {"compile": False}, "parallelism": {"sequenceParallel": 2}},
        "set resources.gpus to the same number",
    ),
    (
        "sequence-parallel-transformer-graphs",
        {
            "resources": {"gpus": 2},
            "parallelism": {"sequenceParallel": 2},
            "runtime": {"cudaGraphs": ["text_encoder", "transformer"]},
        },
        "remove transformer from runtime.cudaGraphs",
    ),
    (
        "fewer-workers-than-gpus",
        {"resources": {"gpus": 4}, "parallelism": {"workers": 2}},
        "parallelism.workers is one per GPU",
    ),
    (
        "workers-beside-sequence-parallel",
        {"resources": {"gpus": 2}, "parallelism": {"workers": 2, "sequenceParallel": 2}},
        "parallelism.workers is one per GPU",
    ),
    ("pvc-dotdot", {"model": {"source": "pvc://claim/../../../etc/passwd"}}, "must not contain '..'"),
    ("file-dotdot", {"model": {"source": "file:///models/../etc"}}, "must not contain '..'"),
    (
        "untyped-toleration",
        {"scheduling": {"tolerations": [{"foo": "bar"}]}},
        'unknown field "spec.scheduling.tolerations[0].foo"',
    ),
    (
        "keyless-toleration",
        {"scheduling": {"tolerations": [{"operator": "Equal", "value": "x"}]}},
        "a toleration without a key must have operator Exists",
    ),
    (
        "affinity-without-values",
        {
            "scheduling": {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In"}]}]
                        }
                    }
                }
            }
        },
        "at least one for In and NotIn",
    ),
    ("bad-node-selector", {"scheduling": {"nodeSelector": {"bad key": "x"}}}, "keys must be label keys"),
    (
        "min-zero-builtin",
        {"autoscaling": {"minReplicas": 0}, "replicas": 0},
        "minReplicas 0 (scale from zero) needs mode keda",
    ),
    ("min-zero-hpa", {"autoscaling": {"mode": "hpa", "minReplicas": 0}, "replicas": 0}, "needs mode keda"),
    (
        "min-zero-floor-one",
        {"autoscaling": {"mode": "keda", "minReplicas": 0}},
        "minReplicas 0 needs replicas 0 too",
    ),
    (
        "min-negative",
        {"autoscaling": {"mode": "keda", "minReplicas": -1}, "replicas": 0},
        "should be greater than or equal to 0",
    ),
    (
        "floor-above-max",
        {"replicas": 9, "autoscaling": {"maxReplicas": 4}},
        "must not exceed autoscaling.maxReplicas",
    ),
    ("bad-max-unavailable", {"disruption": {"maxUnavailable": "half"}}, "a count such as 1 or a percentage"),
    ("key-dot", {"auth": {"apiKeySecretRef": {"name": "keys", "key": "."}}}, "cannot be '.' or '..'"),
    ("key-dotdot", {"model": {"tokenSecretRef": {"name": "hub", "key": ".."}}}, "cannot be '.' or '..'"),
    ("vram-file-on-gpu", {"vram": {"source": "file"}}, "use it on a service with resources.gpus 0"),
    ("image-upper", {"runtime": {"image": "Registry.example/Team/Server:1"}}, "not an image reference"),
    ("image-space", {"runtime": {"image": "zimage/server:1 --privileged"}}, "not an image reference"),
    ("image-empty-tag", {"runtime": {"image": "zimage/server:"}}, "not an image reference"),
    ("image-bad-digest", {"runtime": {"image": "zimage/server@sha256:xyz"}}, "not an image reference"),
]


@pytest.mark.parametrize(("spec", "words"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_manifests_are_refused_at_apply(
    operator: LocalPodRunner, cluster: LocalCluster, namespace: str, spec: dict[str, Any], words: str
) -> None:
    result = apply(cluster, namespace, zis("bad", **spec))
    assert result.returncode != 0
    assert words in result.stderr, result.stderr
    assert cluster.kubectl("get", "zis", "bad", "-n", namespace, check=False).returncode != 0


def test_a_spec_change_rolls_and_an_unchanged_spec_writes_nothing(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, zis("steady", autoscaling={"mode": "none"}, replicas=2))
    wait_settled(api, namespace, "steady")
    before = versions(api, namespace, "steady")
    time.sleep(20)  # longer than the operator's resync interval
    assert versions(api, namespace, "steady") == before, "an unchanged spec caused writes"

    apps = client.AppsV1Api(api)
    generation = apps.read_namespaced_deployment("steady", namespace).metadata.generation
    apply(
        cluster,
        namespace,
        zis("steady", autoscaling={"mode": "none"}, replicas=2, runtime={"maxBatchSize": 8}),
    )

    def rolled() -> bool:
        deployment = apps.read_namespaced_deployment("steady", namespace)
        env = {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}
        return bool(deployment.metadata.generation > generation and env["ZIMAGE_MAX_BATCH_SIZE"] == "8")

    wait_for(rolled, 30, "the Deployment to roll")
    body = wait_ready(api, namespace, "steady")
    assert condition(body, "Ready")["observedGeneration"] == body["metadata"]["generation"]


def test_drift_is_put_back(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, zis("drift", autoscaling={"mode": "none"}, replicas=1))
    wait_ready(api, namespace, "drift")
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)

    core.delete_namespaced_service("drift", namespace)
    wait_for(lambda: core.read_namespaced_service("drift", namespace), 30, "the Service to come back")

    cluster.kubectl("set", "env", "deployment/drift", "-n", namespace, "ZIMAGE_MAX_QUEUE=999", "FOREIGN=1")
    cluster.kubectl("set", "resources", "deployment/drift", "-n", namespace, "--limits=cpu=16")
    cluster.kubectl("scale", "deployment/drift", "-n", namespace, "--replicas=3")
    port = [{"op": "replace", "path": "/spec/ports/0/port", "value": 8080}]
    cluster.kubectl("patch", "service/drift", "-n", namespace, "--type=json", "-p", json.dumps(port))

    def restored() -> bool:
        deployment = apps.read_namespaced_deployment("drift", namespace)
        main = deployment.spec.template.spec.containers[0]
        env = {e.name: e.value for e in main.env}
        ports = [(p.name, p.port) for p in core.read_namespaced_service("drift", namespace).spec.ports]
        return bool(
            env["ZIMAGE_MAX_QUEUE"] == "32"
            and "FOREIGN" not in env
            and "cpu" not in (main.resources.limits or {})
            and deployment.spec.replicas == 1
            and ports == [("http", 80)]
        )

    wait_for(restored, 30, "the hand edits to be undone")
    wait_settled(api, namespace, "drift")
    assert get(api, namespace, "drift")["status"]["endpoint"].endswith(":80")
    # Put back once, then left alone: nothing differs, so nothing is written in a minute.
    before = versions(api, namespace, "drift")
    time.sleep(60)  # four resync intervals
    assert versions(api, namespace, "drift") == before, "the operator kept writing after the repair"

    client.PolicyV1Api(api).delete_namespaced_pod_disruption_budget("drift", namespace)
    wait_for(
        lambda: client.PolicyV1Api(api).read_namespaced_pod_disruption_budget("drift", namespace),
        30,
        "the PDB",
    )


HAND_EDITS: list[tuple[str, list[dict[str, Any]]]] = [
    ("deployment", [{"op": "add", "path": "/spec/template/spec/containers/0/command", "value": ["sh"]}]),
    (
        "deployment",
        [
            {
                "op": "add",
                "path": "/spec/template/spec/initContainers",
                "value": [{"name": "sneak", "image": "busybox", "command": ["true"]}],
            }
        ],
    ),
    ("deployment", [{"op": "add", "path": "/spec/template/spec/hostNetwork", "value": True}]),
    (
        "deployment",
        [
            {
                "op": "add",
                "path": "/spec/template/spec/containers/0/securityContext/capabilities/add",
                "value": ["SYS_ADMIN"],
            }
        ],
    ),
    (
        "deployment",
        [
            {
                "op": "add",
                "path": "/spec/template/spec/containers/0/livenessProbe/initialDelaySeconds",
                "value": 3600,
            }
        ],
    ),
    ("deployment", [{"op": "add", "path": "/spec/paused", "value": True}]),
    ("service", [{"op": "add", "path": "/spec/externalIPs", "value": ["203.0.113.7"]}]),
    (
        "pdb",
        [
            {"op": "remove", "path": "/spec/maxUnavailable"},
            {"op": "add", "path": "/spec/minAvailable", "value": "100%"},
        ],
    ),
]


def test_every_hand_edit_is_put_back_within_one_resync(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    """Fields added beside what the operator renders, each of which changes what runs."""
    apply(cluster, namespace, zis("edited", autoscaling={"mode": "none"}, replicas=1))
    wait_settled(api, namespace, "edited")

    def rendered() -> dict[str, Any]:
        out = cluster.kubectl("get", "deployment,service,pdb", "edited", "-n", namespace, "-o", "json")
        items = json.loads(out.stdout)["items"]
        return {item["kind"]: item["spec"] for item in items}

    want = rendered()
    want["Deployment"].pop("replicas")
    for kind, operations in HAND_EDITS:
        cluster.kubectl("patch", kind, "edited", "-n", namespace, "--type=json", "-p", json.dumps(operations))
        started = time.monotonic()

        def restored() -> bool:
            now = rendered()
            now["Deployment"].pop("replicas")
            return now == want

        wait_for(restored, 16, f"{kind} {operations} to be put back within one resync")
        print(f"{operations[-1]['path']}: put back in {time.monotonic() - started:.1f}s")
    wait_settled(api, namespace, "edited")


def test_deleting_the_service_collects_every_child(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, zis("doomed"))
    wait_ready(api, namespace, "doomed")
    cluster.kubectl("delete", "zis", "doomed", "-n", namespace, "--wait=true", "--timeout=60s")
    selector = "app.kubernetes.io/instance=doomed"

    def gone() -> bool:
        leftovers = cluster.kubectl(
            "get",
            "deployments,replicasets,pods,services,pdb,networkpolicies",
            "-n",
            namespace,
            "-l",
            selector,
            "-o",
            "name",
        )
        return leftovers.stdout.strip() == ""

    wait_for(gone, 60, "garbage collection of the children")


@pytest.mark.parametrize("name", ["b" * 46, "c" * 68, "9lives", "web.app"])
def test_names_that_cannot_name_the_children_are_refused(
    operator: LocalPodRunner, cluster: LocalCluster, namespace: str, name: str
) -> None:
    result = apply(cluster, namespace, zis(name))
    assert result.returncode != 0
    assert "metadata.name must start with a letter" in result.stderr, result.stderr
    assert "at most 45 characters" in result.stderr


FOREIGN = [
    {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "shop", "labels": {"team": "shop"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "shop"}},
            "template": {
                "metadata": {"labels": {"app": "shop"}},
                "spec": {"containers": [{"name": "web", "image": "registry.example/shop:1"}]},
            },
        },
    },
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "shop"},
        "spec": {"selector": {"app": "shop"}, "ports": [{"name": "web", "port": 8080}]},
    },
]


def test_objects_someone_else_made_are_never_taken_over(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    """A team's Service and Deployment named like a new ZImageService: the service is blocked
    with NameConflict naming them, and they stay exactly as they were across its creation,
    scaling and deletion."""
    apply(cluster, namespace, *FOREIGN)
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    wait_for(
        lambda: (apps.read_namespaced_deployment("shop", namespace).status.ready_replicas or 0) == 2,
        60,
        "the team's Deployment",
    )

    def snapshot() -> tuple[str, str]:
        deployment = apps.read_namespaced_deployment("shop", namespace)
        service = core.read_namespaced_service("shop", namespace)
        return json.dumps(api.sanitize_for_serialization(deployment), sort_keys=True), json.dumps(
            api.sanitize_for_serialization(service), sort_keys=True
        )

    before = snapshot()
    apply(cluster, namespace, zis("shop"))

    def blocked() -> dict[str, Any] | None:
        body = get(api, namespace, "shop")
        return body if condition(body, "Degraded").get("reason") == "NameConflict" else None

    body = wait_for(blocked, 15, "Degraded NameConflict")
    message = condition(body, "Degraded")["message"]
    assert f"Deployment {namespace}/shop" in message
    assert f"Service {namespace}/shop" in message
    assert condition(body, "Ready")["status"] == "False"
    assert body["status"]["replicas"] == 0, "the team's replicas are not the service's"
    cluster.kubectl("scale", "zis/shop", "-n", namespace, "--replicas=3")
    time.sleep(20)  # a resync and ten autoscaler passes
    assert snapshot() == before
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=shop").items
    assert not [e for e in events if e.reason in ("ScaledUp", "ScaledDown")]
    assert condition(get(api, namespace, "shop"), "Degraded")["reason"] == "NameConflict"

    cluster.kubectl("delete", "zis/shop", "-n", namespace)
    time.sleep(5)  # garbage collection
    assert snapshot() == before
    # The team's objects gone, a service of that name comes up as usual.
    cluster.kubectl("delete", "deployment/shop", "service/shop", "-n", namespace)
    apply(cluster, namespace, zis("shop"))
    wait_ready(api, namespace, "shop")


def test_the_longest_name_allowed_becomes_ready(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    name = "l" * 45
    apply(cluster, namespace, zis(name, model={"source": "hf://Tongyi-MAI/Z-Image-Turbo", "cache": {}}))
    # Every child was admitted: the prefetch Job, whose name is the longest, waits for its claim.
    wait_for(lambda: client.BatchV1Api(api).list_namespaced_job(namespace).items, 30, "the prefetch Job")
    assert condition(get(api, namespace, name), "Degraded").get("reason") != "ApplyFailed"


def _children_once(api: client.ApiClient, namespace: str, name: str) -> bool:
    selector = f"app.kubernetes.io/instance={name}"
    apps, core, policy = client.AppsV1Api(api), client.CoreV1Api(api), client.PolicyV1Api(api)
    counts = [
        len(apps.list_namespaced_deployment(namespace, label_selector=selector).items),
        len(core.list_namespaced_service(namespace, label_selector=selector).items),
        len(policy.list_namespaced_pod_disruption_budget(namespace, label_selector=selector).items),
    ]
    return counts == [1, 1, 1]


def test_an_operator_killed_mid_reconcile_converges_without_duplicates(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    names = [f"svc-{i}" for i in range(6)]
    leading_process(operator, api)
    apply(cluster, namespace, *(zis(name) for name in names))
    time.sleep(0.3)  # the operator is now in the middle of reconciling them
    before = kill_leader(operator, api)
    wait_for(lambda: before not in operator.pids(), 30, "the operator to be restarted")
    for name in names:
        wait_ready(api, namespace, name)
        assert _children_once(api, namespace, name)
        replica_sets = client.AppsV1Api(api).list_namespaced_replica_set(
            namespace, label_selector=f"app.kubernetes.io/instance={name}"
        )
        assert len(replica_sets.items) == 1, "a second rollout means the operator wrote two different specs"


def test_twenty_services_applied_at_once_all_become_ready(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    # 20 one-GPU services need more than the two 8-GPU nodes the cluster starts with.
    extra = cluster.add_gpu_nodes(range(2, 5))
    try:
        names = [f"many-{i:02d}" for i in range(20)]
        started = time.monotonic()
        result = apply(cluster, namespace, *(zis(name) for name in names))
        assert result.returncode == 0, result.stderr
        for name in names:
            wait_ready(api, namespace, name, timeout=120)
        seconds = time.monotonic() - started
        print(f"20 ZImageServices Ready in {seconds:.1f}s")
        assert seconds < 60
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=120s", check=False)
        cluster.kubectl("delete", "node", *extra, check=False)


CAN = [
    ("get", "zimageservices.zimage.dev", "-A"),
    ("watch", "zimageservices.zimage.dev", "-A"),
    ("patch", "zimageservices.zimage.dev", "--subresource=status", "-n", "default"),
    ("create", "deployments.apps", "-n", "default"),
    ("patch", "deployments.apps", "-n", "default"),
    ("patch", "services", "-n", "default"),
    ("patch", "poddisruptionbudgets.policy", "-n", "default"),
    ("patch", "networkpolicies.networking.k8s.io", "-n", "default"),
    ("delete", "networkpolicies.networking.k8s.io", "-n", "default"),
    ("delete", "jobs.batch", "-n", "default"),
    ("list", "pods", "-n", "default"),
    ("create", "events", "-n", "default"),
]
CANNOT = [
    ("list", "secrets", "-A"),
    ("get", "secrets", "-n", "default"),
    ("delete", "deployments.apps", "-n", "default"),
    ("delete", "zimageservices.zimage.dev", "-n", "default"),
    ("patch", "zimageservices.zimage.dev", "-n", "default"),  # the spec is the user's; no finalizers
    ("update", "zimageservices.zimage.dev", "-n", "default"),
    ("create", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "pods", "-n", "default"),
    ("delete", "nodes"),
    ("*", "*", "-A"),
]


def test_the_operator_account_can_do_what_it_needs_and_no_more(
    operator: LocalPodRunner, cluster: LocalCluster
) -> None:
    for args in CAN:
        result = cluster.kubectl("auth", "can-i", f"--as={SA}", *args, check=False)
        assert result.stdout.strip() == "yes", args
    for args in CANNOT:
        result = cluster.kubectl("auth", "can-i", f"--as={SA}", *args, check=False)
        assert result.stdout.strip() == "no", args
    granted = set()
    for doc in yaml.safe_load_all((ROOT / "deploy/operator/rbac.yaml").read_text()):
        for rule in doc.get("rules", []):
            assert "*" not in rule["verbs"], rule
            assert "*" not in rule["resources"], rule
            granted |= {(group, resource) for group in rule["apiGroups"] for resource in rule["resources"]}
    # KEDA's kinds, which can-i cannot check where KEDA is not installed.
    assert {("keda.sh", "scaledobjects"), ("http.keda.sh", "httpscaledobjects")} <= granted


def test_a_model_cache_is_prefetched_before_the_servers_start(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    spec = {"model": {"source": "hf://Tongyi-MAI/Z-Image-Turbo", "cache": {"size": "40Gi"}}}
    apply(cluster, namespace, zis("cached", **spec))

    # No volume can be provisioned yet: the cache claim waits, and so does the service.
    def waiting() -> dict[str, Any] | None:
        body = get(api, namespace, "cached")
        return body if condition(body, "ModelReady").get("status") == "False" else None

    body = wait_for(waiting, 30, "ModelReady=False")
    assert condition(body, "Ready")["reason"] == "WaitingForModel"
    apps = client.AppsV1Api(api)
    assert apps.read_namespaced_deployment("cached", namespace).spec.replicas == 0
    claim = client.CoreV1Api(api).read_namespaced_persistent_volume_claim("cached-model-cache", namespace)
    assert claim.spec.resources.requests["storage"] == "40Gi"

    # A volume appears; the prefetch Job runs to completion, then the servers start.
    volume = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-cache"},
        "spec": {
            "capacity": {"storage": "40Gi"},
            "accessModes": ["ReadWriteMany"],
            "hostPath": {"path": "/tmp/zimage-test-cache"},
            "claimRef": {"namespace": namespace, "name": "cached-model-cache"},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(volume))
    try:
        body = wait_ready(api, namespace, "cached", timeout=90)
        assert condition(body, "ModelReady")["reason"] == "CachePopulated"
        deployment = apps.read_namespaced_deployment("cached", namespace)
        env = {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}
        assert env["HF_HUB_OFFLINE"] == "1"
        jobs = client.BatchV1Api(api).list_namespaced_job(namespace).items
        assert [job.metadata.name.startswith("cached-prefetch-") for job in jobs] == [True]
    finally:
        cluster.kubectl("delete", "pv", f"{namespace}-cache", "--wait=false", check=False)


def test_the_operator_answers_its_liveness_endpoint(operator: LocalPodRunner, api: client.ApiClient) -> None:
    import httpx

    # Both replicas answer: the leader, and the standby that waits to take over.
    for pod in client.CoreV1Api(api).list_namespaced_pod("zimage-system").items:
        response = httpx.get(f"http://{pod.status.pod_ip}:8080/healthz", timeout=5)
        assert response.status_code == 200
    assert len(operator.pids()) == 2


def test_a_namespace_scoped_operator_works_under_the_charts_namespaced_rbac(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    """The chart installed with watch.namespaces: the operator runs with a token of the chart's
    ServiceAccount, which holds a Role in that namespace only, and serves it end to end. A
    permission taken away is said once, with what to grant, and fails liveness."""

    core = client.CoreV1Api(api)
    other, home = f"{namespace}-x"[:63], f"{namespace}-op"[:63]
    for extra in (other, home):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=extra)))
    cluster.kubectl("scale", "deployment/zimage-operator", "-n", "zimage-system", "--replicas=0")
    wait_for(lambda: not operator.pids(), 30, "the cluster-wide operator to stop")

    def helm(*args: str) -> None:
        result = cluster.helm(tmp_path, *args, namespace=home)
        assert result.returncode == 0, result.stderr

    def scoped_pod() -> Any:
        pods = [p for p in core.list_namespaced_pod(home).items if not p.metadata.deletion_timestamp]
        return pods[0] if len(pods) == 1 and operator.address_of(home, pods[0].metadata.name) else None

    def healthz() -> httpx.Response:
        pod = wait_for(scoped_pod, 60, "the namespaced operator's process")
        address = wait_for(lambda: core.read_namespaced_pod(pod.metadata.name, home).status.pod_ip, 30, "IP")
        answer: httpx.Response = wait_for(
            lambda: _get_or_none(f"http://{address}:8080/healthz"), 30, "/healthz"
        )
        return answer

    values = ["--set", f"watch.namespaces={{{namespace}}}", "--set", "replicaCount=1", "--skip-crds"]
    try:
        helm("install", "scoped", str(ROOT / "charts/zimage-operator"), *values)
        pod = wait_for(scoped_pod, 60, "the namespaced operator's process")
        assert pod.spec.service_account_name == "scoped-zimage-operator"
        apply(cluster, namespace, zis("inside"))
        apply(cluster, other, zis("outside"))
        wait_settled(api, namespace, "inside")
        assert healthz().status_code == 200
        time.sleep(3)
        assert "status" not in get(api, other, "outside"), "a namespaced operator touched another namespace"
        log = operator.workdir / f"{home}_{pod.metadata.name}.log"
        assert "403" not in log.read_text(), "the operator asked for something its Role does not grant"

        # The Role loses pods: liveness fails and the log says what to grant, once.
        role = client.RbacAuthorizationV1Api(api).read_namespaced_role("scoped-zimage-operator", namespace)
        role.rules = [rule for rule in role.rules if rule.resources != ["pods"]]
        client.RbacAuthorizationV1Api(api).replace_namespaced_role("scoped-zimage-operator", namespace, role)
        core.delete_namespaced_pod(pod.metadata.name, home, grace_period_seconds=0)
        wait_for(lambda: healthz().status_code == 503, 60, "liveness to fail")
        assert f"list, watch on pods in namespace {namespace}" in healthz().text
        pod = wait_for(scoped_pod, 60, "the namespaced operator's process")
        log = operator.workdir / f"{home}_{pod.metadata.name}.log"
        time.sleep(3)
        said = log.read_text()
        assert said.count("lacks permissions it needs") == 1, said[-3000:]
        assert "APIForbiddenError" not in said, "Kopf's refused watch was logged over and over"
    finally:
        cluster.helm(tmp_path, "uninstall", "scoped", "--wait", namespace=home)
        cluster.kubectl("scale", "deployment/zimage-operator", "-n", "zimage-system", "--replicas=2")
    try:
        wait_for(lambda: operator.pids(), 60, "the cluster-wide operator to come back")
        wait_ready(api, other, "outside")
    finally:
        for extra in (other, home):
            cluster.kubectl("delete", "namespace", extra, "--wait=false")


def _get_or_none(url: str) -> Any:
    import httpx

    try:
        return httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return None


def test_a_vram_restart_is_recorded_as_an_event_and_in_the_status(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, zis("hungry"))
    wait_ready(api, namespace, "hungry")
    core = client.CoreV1Api(api)
    (pod,) = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/instance=hungry").items
    message = "zimage: VRAM limit exceeded (process): 75.00 GiB used, limit 72.00 GiB"
    # What the kubelet reports after liveness failed and the container was restarted.
    status = {
        "containerStatuses": [
            {
                "name": "server",
                "image": pod.spec.containers[0].image,
                "imageID": "",
                "ready": True,
                "restartCount": 1,
                "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                "lastState": {
                    "terminated": {
                        "exitCode": 137,
                        "reason": "Error",
                        "message": message,
                        "finishedAt": "2026-01-01T00:00:00Z",
                    }
                },
            }
        ]
    }
    core.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": status})

    def recorded() -> list[Any]:
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=hungry").items
        return [e for e in events if e.reason == "VramLimitRestart"]

    (event,) = wait_for(recorded, 30, "a VramLimitRestart event")
    assert event.type == "Warning"
    assert message in event.message
    last = get(api, namespace, "hungry")["status"]["lastVramRestart"]
    assert last == {
        "pod": pod.metadata.name,
        "container": "server",
        "restartCount": 1,
        "finishedAt": "2026-01-01T00:00:00Z",
        "message": message,
    }

    # A new operator (killed and started again) reads what was reported from the status: the
    # same restart is not reported twice; a later one is.
    before = kill_leader(operator, api)
    wait_for(lambda: before not in operator.pids(), 30, "the operator to be restarted")
    apply(cluster, namespace, zis("hungry", disruption={"maxUnavailable": 2}))  # a reconcile, no rollout
    wait_for(
        lambda: condition(get(api, namespace, "hungry"), "Ready").get("observedGeneration") == 2,
        60,
        "the restarted operator to reconcile the service",
    )
    assert len(recorded()) == 1, "the restart was reported again after the operator restarted"
    status["containerStatuses"][0]["restartCount"] = 2
    status["containerStatuses"][0]["lastState"]["terminated"]["finishedAt"] = "2026-01-01T00:05:00Z"
    core.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": status})
    wait_for(lambda: len(recorded()) == 2 or None, 30, "the second restart's event")


def _degraded_for(api: client.ApiClient, namespace: str, name: str, reason: str, words: str) -> Any:
    def shown() -> dict[str, Any] | None:
        found = condition(get(api, namespace, name), "Degraded")
        ok = found.get("status") == "True" and found.get("reason") == reason and words in found["message"]
        return found if ok else None

    return shown


def test_pod_failures_show_within_seconds_and_hold_while_they_last(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    """What the kubelet reports of a crash loop and of a volume it cannot mount: Degraded with
    the reason well within a resync (the pods are watched), held through every state of the
    loop, and cleared once the pod is ready."""
    apply(cluster, namespace, zis("loop", autoscaling={"mode": "none"}, replicas=1))
    wait_settled(api, namespace, "loop")
    core = client.CoreV1Api(api)
    (pod,) = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/instance=loop").items
    image = pod.spec.containers[0].image
    exit_1 = {"exitCode": 1, "reason": "Error", "finishedAt": "2026-01-01T00:00:00Z"}

    def report(state: dict[str, Any], ready: bool, restarts: int) -> None:
        server = {"name": "server", "image": image, "imageID": "", "ready": ready, "restartCount": restarts}
        server["state"] = state
        if restarts:
            server["lastState"] = {"terminated": exit_1}
        conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
        status = {"containerStatuses": [server], "conditions": conditions}
        core.patch_namespaced_pod_status(pod.metadata.name, namespace, {"status": status})

    started = time.monotonic()
    report({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}, False, 1)
    crash = _degraded_for(api, namespace, "loop", "PodsFailing", "keeps exiting, last with code 1")
    first = wait_for(crash, 15, "Degraded PodsFailing")
    print(f"crash loop shown in {time.monotonic() - started:.1f}s")
    loop_states: list[tuple[dict[str, Any], int]] = [
        ({"running": {"startedAt": "2026-01-01T00:00:10Z"}}, 1),
        ({"terminated": exit_1}, 2),
    ]
    for state, restarts in loop_states:
        report(state, False, restarts)
        time.sleep(3)
        held = crash()
        assert held is not None, "Degraded flapped while the loop went on"
        assert held["lastTransitionTime"] == first["lastTransitionTime"]
    report({"running": {"startedAt": "2026-01-01T00:01:00Z"}}, True, 2)
    wait_for(lambda: condition(get(api, namespace, "loop"), "Degraded").get("status") == "False", 15, "clear")

    # A Secret volume the kubelet cannot mount: the pod waits in ContainerCreating, and only an
    # Event says why.
    report({"waiting": {"reason": "ContainerCreating"}}, False, 0)
    event = {
        "metadata": {"generateName": "loop-mount-"},
        "involvedObject": {"kind": "Pod", "name": pod.metadata.name, "namespace": namespace},
        "reason": "FailedMount",
        "type": "Warning",
        "message": 'MountVolume.SetUp failed for volume "api-keys" : secret "keys" not found',
        "source": {"component": "kubelet"},
    }
    core.create_namespaced_event(namespace, event)
    started = time.monotonic()
    mount = _degraded_for(api, namespace, "loop", "PodsFailing", "FailedMount: MountVolume.SetUp failed")
    wait_for(mount, 15, "Degraded FailedMount")
    print(f"FailedMount shown in {time.monotonic() - started:.1f}s")
    time.sleep(16)  # past a resync
    assert mount() is not None

    # Image and configuration errors, in the kubelet's words.
    for reason, message in [
        ("ErrImagePull", 'failed to pull image "registry.example/zimage:9": not found'),
        ("CreateContainerConfigError", 'secret "hub-token" not found'),
    ]:
        report({"waiting": {"reason": reason, "message": message}}, False, 0)
        wait_for(_degraded_for(api, namespace, "loop", "PodsFailing", f"{reason}: {message}"), 15, reason)


def test_kubectl_scale_below_the_autoscalers_floor_says_why_nothing_happens(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, zis("floor"))
    wait_settled(api, namespace, "floor")
    assert condition(get(api, namespace, "floor"), "ScalingLimited")["status"] == "False"
    cluster.kubectl("scale", "zis/floor", "-n", namespace, "--replicas=0")

    def explained() -> dict[str, Any] | None:
        found = condition(get(api, namespace, "floor"), "ScalingLimited")
        return found if found.get("reason") == "BelowMinReplicas" else None

    found = wait_for(explained, 15, "ScalingLimited BelowMinReplicas")
    assert "set autoscaling.mode none and replicas 0" in found["message"]
    assert client.AppsV1Api(api).read_namespaced_deployment("floor", namespace).spec.replicas == 1


def test_fifty_patches_in_ten_seconds_roll_the_pods_at_most_twice(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, zis("churn", autoscaling={"mode": "none"}, replicas=1))
    wait_settled(api, namespace, "churn")
    custom = client.CustomObjectsApi(api)
    started = time.monotonic()
    for index in range(50):
        patch = {"spec": {"runtime": {"maxQueue": 10 + index}}}
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "churn", patch)
        time.sleep(max(0.0, started + (index + 1) * 0.2 - time.monotonic()))
    wait_settled(api, namespace, "churn")
    deployment = client.AppsV1Api(api).read_namespaced_deployment("churn", namespace)
    env = {e.name: e.value for e in deployment.spec.template.spec.containers[0].env}
    assert env["ZIMAGE_MAX_QUEUE"] == "59", "the last change is what runs"
    sets = client.AppsV1Api(api).list_namespaced_replica_set(namespace).items
    rollouts = len(sets) - 1
    print(f"50 patches in {time.monotonic() - started:.1f}s made {rollouts} rollouts")
    assert 1 <= rollouts <= 2


def test_a_network_policy_keeps_other_pods_off_the_health_port_and_goes_when_turned_off(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    apply(cluster, namespace, zis("fenced"))
    wait_ready(api, namespace, "fenced")
    policies = client.NetworkingV1Api(api)
    policy = wait_for(
        lambda: policies.read_namespaced_network_policy("fenced", namespace), 30, "the NetworkPolicy"
    )
    assert policy.metadata.owner_references[0].kind == "ZImageService"
    assert policy.spec.pod_selector.match_labels["app.kubernetes.io/instance"] == "fenced"
    assert policy.spec.policy_types == ["Ingress"]
    (rule,) = policy.spec.ingress
    assert rule._from is None, "the serving port from anywhere"
    assert [(port.protocol, port.port) for port in rule.ports] == [("TCP", "http")]

    # A rule someone adds for the health port is put back.
    opened = [{"op": "add", "path": "/spec/ingress/-", "value": {"ports": [{"port": "health"}]}}]
    cluster.kubectl("patch", "networkpolicy/fenced", "-n", namespace, "--type=json", "-p", json.dumps(opened))
    wait_for(
        lambda: len(policies.read_namespaced_network_policy("fenced", namespace).spec.ingress) == 1,
        30,
        "the added rule to be removed",
    )

    apply(cluster, namespace, zis("fenced", networkPolicy={"enabled": False}))
    wait_for(
        lambda: not policies.list_namespaced_network_policy(namespace).items, 30, "the NetworkPolicy to go"
    )
    wait_ready(api, namespace, "fenced")


def test_hpa_mode_makes_an_hpa_and_switching_away_removes_it(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    scaling = {"mode": "hpa", "minReplicas": 1, "maxReplicas": 5, "targetQueuePerReplica": 4}
    apply(cluster, namespace, zis("elastic", autoscaling=scaling))
    wait_ready(api, namespace, "elastic")
    hpas = client.AutoscalingV2Api(api)
    hpa = wait_for(
        lambda: hpas.read_namespaced_horizontal_pod_autoscaler("elastic", namespace), 30, "the HPA"
    )
    assert hpa.spec.max_replicas == 5
    assert hpa.spec.metrics[0].pods.metric.name == "zimage_queue_depth"
    assert hpa.metadata.owner_references[0].kind == "ZImageService"

    apply(cluster, namespace, zis("elastic", autoscaling={**scaling, "mode": "builtin"}))

    def removed() -> bool:
        items = hpas.list_namespaced_horizontal_pod_autoscaler(namespace).items
        return not items

    wait_for(removed, 30, "the HPA to be removed after switching to builtin")
    wait_ready(api, namespace, "elastic")


def keda_crd(cluster: LocalCluster, name: str) -> Path:
    """One of KEDA's own CRDs, which the cluster set-up reads from KEDA's Go modules."""
    return cluster.binaries / "crds/keda" / name


def test_keda_mode_needs_keda_and_switching_away_removes_the_scaled_object(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    scaling = {"mode": "keda", "minReplicas": 1, "maxReplicas": 6, "targetQueuePerReplica": 4}
    apply(cluster, namespace, zis("kedaful", autoscaling=scaling))

    def degraded() -> dict[str, Any] | None:
        item = condition(get(api, namespace, "kedaful"), "Degraded")
        return item if item.get("reason") == "KedaNotInstalled" else None

    assert "scaledobjects.keda.sh is not installed" in wait_for(degraded, 30, "KedaNotInstalled")["message"]

    crd = keda_crd(cluster, "keda.sh_scaledobjects.yaml")
    cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", "crd/scaledobjects.keda.sh", "--timeout=60s")
    try:
        custom = client.CustomObjectsApi(api)

        def scaled_object() -> dict[str, Any]:
            result: dict[str, Any] = custom.get_namespaced_custom_object(
                "keda.sh", "v1alpha1", namespace, "scaledobjects", "kedaful"
            )
            return result

        found = wait_for(scaled_object, 60, "the ScaledObject")
        assert found["spec"]["maxReplicaCount"] == 6
        (trigger,) = found["spec"]["triggers"]
        assert (trigger["type"], trigger["metadata"]["threshold"]) == ("prometheus", "4")
        wait_for(
            lambda: condition(get(api, namespace, "kedaful"), "Degraded").get("status") == "False", 30, "ok"
        )

        apply(cluster, namespace, zis("kedaful", autoscaling={**scaling, "mode": "none"}))

        def removed() -> bool:
            items = custom.list_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "scaledobjects")
            return not items["items"]

        wait_for(removed, 30, "the ScaledObject to be removed after switching to none")
    finally:
        cluster.kubectl("delete", "-f", str(crd), "--wait=true", check=False)


def test_scale_from_zero_is_keda_http_add_on_and_holds_no_replica_until_asked(
    operator: LocalPodRunner, cluster: LocalCluster, api: client.ApiClient, namespace: str
) -> None:
    scaling = {"mode": "keda", "minReplicas": 0, "maxReplicas": 3, "targetQueuePerReplica": 2}
    apply(cluster, namespace, zis("sleepy", autoscaling=scaling, replicas=0))

    def blocked() -> dict[str, Any] | None:
        item = condition(get(api, namespace, "sleepy"), "Degraded")
        return item if item.get("reason") == "KedaHttpAddOnNotInstalled" else None

    message = wait_for(blocked, 30, "KedaHttpAddOnNotInstalled")["message"]
    assert "httpscaledobjects.http.keda.sh is not installed" in message
    assert "set minReplicas 1" in message

    crds = [
        keda_crd(cluster, f) for f in ("keda.sh_scaledobjects.yaml", "http.keda.sh_httpscaledobjects.yaml")
    ]
    for crd in crds:
        cluster.kubectl("apply", "--server-side", "-f", str(crd))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/scaledobjects.keda.sh",
        "crd/httpscaledobjects.http.keda.sh", "--timeout=60s",
    )  # fmt: skip
    custom = client.CustomObjectsApi(api)
    apps = client.AppsV1Api(api)
    try:

        def http_scaled_object() -> dict[str, Any]:
            result: dict[str, Any] = custom.get_namespaced_custom_object(
                "http.keda.sh", "v1alpha1", namespace, "httpscaledobjects", "sleepy"
            )
            return result

        # Admitted by the add-on's own schema (its rules included).
        found = wait_for(http_scaled_object, 60, "the HTTPScaledObject")["spec"]
        assert found["replicas"] == {"min": 0, "max": 3}
        assert found["scaleTargetRef"]["service"] == "sleepy"
        assert found["scalingMetric"]["concurrency"]["targetValue"] == 2
        assert f"sleepy.{namespace}.svc.cluster.local" in found["hosts"]
        # The add-on makes the ScaledObject from it; the operator writes none of its own.
        listed = custom.list_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "scaledobjects")
        assert listed["items"] == []

        def asleep() -> dict[str, Any] | None:
            body = get(api, namespace, "sleepy")
            ready = condition(body, "Ready")
            healthy = condition(body, "Degraded").get("status") == "False"
            return body if ready.get("reason") == "ScaledToZero" and healthy else None

        wait_for(asleep, 30, "ScaledToZero with nothing degraded")
        assert apps.read_namespaced_deployment("sleepy", namespace).spec.replicas == 0

        # A request arrives: the add-on scales the Deployment, and the operator leaves it so.
        cluster.kubectl("scale", "deployment/sleepy", "-n", namespace, "--replicas=1")
        body = wait_ready(api, namespace, "sleepy", timeout=90)
        assert condition(body, "Ready")["reason"] == "Serving"
        time.sleep(3)  # a resync or two
        assert apps.read_namespaced_deployment("sleepy", namespace).spec.replicas == 1

        apply(cluster, namespace, zis("sleepy", autoscaling={**scaling, "minReplicas": 1}, replicas=1))

        def switched() -> bool:
            items = custom.list_namespaced_custom_object(
                "http.keda.sh", "v1alpha1", namespace, "httpscaledobjects"
            )
            objects = custom.list_namespaced_custom_object("keda.sh", "v1alpha1", namespace, "scaledobjects")
            return not items["items"] and [o["metadata"]["name"] for o in objects["items"]] == ["sleepy"]

        wait_for(switched, 30, "the HTTPScaledObject replaced by a ScaledObject above zero")
    finally:
        cluster.kubectl("delete", "zis", "sleepy", "-n", namespace, "--wait=true", check=False)
        for crd in crds:
            cluster.kubectl("delete", "-f", str(crd), "--wait=true", check=False)


def test_the_kustomize_base_and_every_example_pass_a_server_side_dry_run(
    operator: LocalPodRunner, cluster: LocalCluster
) -> None:
    base = cluster.kubectl("apply", "-k", str(ROOT / "deploy"), "--dry-run=server", check=False)
    assert base.returncode == 0, base.stderr
    if cluster.kubectl("get", "namespace", "ml", check=False).returncode != 0:
        cluster.kubectl("create", "namespace", "ml")
    try:
        examples = sorted((ROOT / "deploy/examples").glob("*.yaml"))
        assert len(examples) >= 2
        for example in examples:
            result = cluster.kubectl("apply", "--dry-run=server", "-f", str(example), check=False)
            assert result.returncode == 0, f"{example.name}: {result.stderr}"
    finally:
        cluster.kubectl("delete", "namespace", "ml", "--wait=false", check=False)
