"""Admission parity: whatever the API server admits as a ZImageService, the API server also
admits its children, and the server starts on the environment the operator gives it.

Specs are drawn by hypothesis from values on both sides of every limit; the real API server
decides (a server-side dry run) which are admitted, and each admitted one must run."""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient

from tests.cluster.pod_runner import LocalPodRunner
from zimage_operator import builders
from zimage_operator.builders import Owner
from zimage_operator.config import OperatorSettings
from zimage_operator.spec import IMAGE_REFERENCE, parse_spec
from zimage_server.core.config import load_settings

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

GROUP, VERSION, PLURAL = "zimage.dev", "v1alpha1", "zimageservices"

names = st.one_of(
    st.text(string.ascii_lowercase + string.digits + "-.", min_size=1, max_size=70),
    st.sampled_from(["posters", "a" * 45, "a" * 46, "b" * 68, "9lives", "web.app", "x-"]),
)
sources = st.sampled_from(
    [
        "hf://Tongyi-MAI/Z-Image-Turbo",
        "hf://team/model@v1.2",
        "pvc://weights/z-image",
        "pvc://weights",
        "pvc://claim/../../../etc/passwd",
        "pvc://claim/models/..",
        "file:///models/z-image",
        "file:///models/../etc",
        "builtin://tiny",
    ]
)
sides = st.one_of(st.sampled_from([16, 240, 256, 1000, 1008, 1024, 2048, 2064]), st.integers(0, 9999))
sizes = st.builds(lambda w, h: f"{w}x{h}", sides, sides)
byte_limits = st.sampled_from(["0", "0Gi", "1", "512Mi", "1Gi", "70Gi", "90%", "0%", "100%", "150%", "0.5%"])
backends = st.sampled_from(
    ["auto", "native", "_native_cudnn", "_native_flash", "_native_math", "flash", "_flash_3", "magic", "sage"]
)
gpu_names = st.sampled_from(
    ["nvidia.com/gpu", "amd.com/gpu", "memory", "cpu", "gpu", "kubernetes.io/gpu", "example.com/x", "a/b"]
)
images = st.sampled_from(
    [
        "",
        "zimage/zimage-server:0.1.0",
        "registry.example:5000/team/zimage-server@sha256:" + "a" * 64,
        "Registry.example/Team/Server:1",
        "zimage/server:1 --privileged",
        "zimage/server:",
        "zimage/server@sha256:xyz",
    ]
)
secret_keys = st.sampled_from(["keys", "api.keys", "..keys", ".", "..", "a/b", ""])
quantities = st.sampled_from(["0", "1", "100m", "1Gi", "48Gi", "8", "0.5", "2Ti"])
tolerations = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "key": st.sampled_from(["", "nvidia.com/gpu", "bad key", "dedicated"]),
            "operator": st.sampled_from(["Exists", "Equal"]),
            "value": st.sampled_from(["", "true", "not valid!"]),
            "effect": st.sampled_from(["NoSchedule", "NoExecute", "PreferNoSchedule"]),
            "tolerationSeconds": st.integers(-5, 600),
        },
    ),
    max_size=3,
)
node_requirements = st.fixed_dictionaries(
    {
        "key": st.sampled_from(["nvidia.com/gpu.product", "zone", "bad key"]),
        "operator": st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]),
    },
    optional={"values": st.lists(st.sampled_from(["H100", "3", "a b"]), max_size=2)},
)
affinities = st.one_of(
    st.just({}),
    st.builds(
        lambda terms: {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}
        },
        st.lists(
            st.fixed_dictionaries({"matchExpressions": st.lists(node_requirements, max_size=2)}), max_size=2
        ),
    ),
)
lora_sources = st.sampled_from(
    [
        "hf://acme/pixel-art",
        "hf://acme/styles/ink/ink.safetensors@v2",
        "hf://acme",
        "pvc://adapters/pixel.safetensors",
        "pvc://adapters",
        "pvc://adapters/../secrets/x",
        "file:///opt/adapters/ink",
        "file://relative",
        "s3://bucket/a.safetensors",
        "/opt/adapters/ink",
    ]
)
loras = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["pixel", "ink", "pixel.v2", "Pixel", "-x", "z-image-turbo", "a" * 64]),
            "source": lora_sources,
        },
        optional={"scale": st.sampled_from([0, 0.8, 1, -2, 2, 2.5, -3])},
    ),
    max_size=3,
)
specs = st.fixed_dictionaries(
    {},
    optional={
        "model": st.fixed_dictionaries({"source": sources}),
        "loras": loras,
        "runtime": st.fixed_dictionaries(
            {},
            optional={
                "attentionBackend": backends,
                "warmupSizes": st.lists(sizes, max_size=3),
                "maxBatchSize": st.integers(-1, 70),
                "maxQueue": st.integers(0, 5),
                "batchWaitMs": st.integers(-1, 20000),
                "requestTimeoutSeconds": st.integers(0, 4000),
                "precision": st.sampled_from(["bf16", "fp8", "int4"]),
                "cudaGraphs": st.lists(st.sampled_from(["text_encoder", "transformer", "vae"]), max_size=2),
                "logLevel": st.sampled_from(["debug", "info", "trace"]),
                "image": images,
            },
        ),
        "resources": st.fixed_dictionaries(
            {},
            optional={
                "gpus": st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 9]),
                "gpuResourceName": gpu_names,
                "memory": quantities,
                "cpu": quantities,
            },
        ),
        "parallelism": st.fixed_dictionaries(
            {},
            optional={"workers": st.integers(0, 9), "sequenceParallel": st.integers(0, 9)},
        ),
        "vram": st.fixed_dictionaries(
            {},
            optional={
                "limit": byte_limits,
                "scope": st.sampled_from(["process", "device"]),
                "periodSeconds": st.integers(0, 400),
                "source": st.sampled_from(["nvml", "file"]),
            },
        ),
        "autoscaling": st.fixed_dictionaries(
            {},
            optional={
                "mode": st.sampled_from(["builtin", "hpa", "keda", "none"]),
                "minReplicas": st.integers(-1, 3),
                "maxReplicas": st.integers(0, 4),
            },
        ),
        "replicas": st.integers(-1, 6),
        "scheduling": st.fixed_dictionaries(
            {},
            optional={
                "tolerations": tolerations,
                "affinity": affinities,
                "nodeSelector": st.dictionaries(
                    st.sampled_from(["nvidia.com/gpu.product", "bad key"]),
                    st.sampled_from(["H100", "not ok!"]),
                    max_size=2,
                ),
            },
        ),
        "auth": st.fixed_dictionaries(
            {
                "apiKeySecretRef": st.fixed_dictionaries(
                    {"name": st.sampled_from(["keys", "Bad_Name"])}, optional={"key": secret_keys}
                )
            }
        ),
    },
)


def _admitted(custom: client.CustomObjectsApi, namespace: str, name: str, spec: Any) -> Any:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ZImageService", "metadata": {"name": name}}
    body["spec"] = spec
    try:
        return custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, dry_run="All")
    except ApiException as exc:
        if exc.status not in (400, 422):  # refused with a message, never a server error
            raise AssertionError(f"the API server answered {exc.status} for {spec}: {exc.body}") from exc
        return None


def _children(body: dict[str, Any]) -> list[dict[str, Any]]:
    meta = body["metadata"]
    owner = Owner(meta["name"], meta["namespace"], "00000000-0000-0000-0000-000000000001")
    spec = parse_spec(body["spec"])
    operator_settings = OperatorSettings(_env_file=None)
    children = [
        builders.build_deployment(
            owner, spec, operator_settings, builders.desired_replicas(spec, None, True)
        ),
        builders.build_service(owner, spec),
        builders.build_pdb(owner, spec),
    ]
    if spec.network_policy.enabled:
        children.append(builders.build_network_policy(owner))
    if spec.autoscaling.mode == "hpa":
        children.append(builders.build_hpa(owner, spec))
    claim = builders.build_cache_claim(owner, spec)
    job = builders.build_prefetch_job(owner, spec, operator_settings)
    if claim is not None and job is not None:
        children += [claim, job]
    return children


def _server_environment(deployment: dict[str, Any], secrets: Path) -> dict[str, str]:
    """What the kubelet would give the server: secret values stand in for secretKeyRef, and a
    Secret volume is a folder under ``secrets`` holding a key in each of its items."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    remap: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        folder = secrets / mount["name"]
        folder.mkdir(parents=True, exist_ok=True)
        for item in secret.get("items", []):
            (folder / item["path"]).write_text("a-secret-value\n")
        remap[mount["mountPath"]] = str(folder)
    env = {}
    for item in container["env"]:
        value = item.get("value", "a-secret-value")
        for mount_path, folder in remap.items():
            value = value.replace(mount_path, folder, 1) if value.startswith(mount_path + "/") else value
        env[item["name"]] = value
    return env


def _dry_run_create(dynamic: DynamicClient, manifest: dict[str, Any]) -> None:
    resource = dynamic.resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
    resource.create(body=manifest, namespace=manifest["metadata"]["namespace"], dry_run="All")


def test_every_admitted_spec_makes_admitted_children_and_a_server_that_starts(
    operator: LocalPodRunner, api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    secrets = tmp_path / "secrets"
    custom, dynamic = client.CustomObjectsApi(api), DynamicClient(api)
    admitted: list[str] = []
    refused: list[str] = []

    @settings(
        max_examples=400,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(name=names, spec=specs)
    def check(name: str, spec: dict[str, Any]) -> None:
        body = _admitted(custom, namespace, name, spec)
        if body is None:
            refused.append(name)
            return
        admitted.append(name)
        children = _children(body)
        for child in children:
            try:
                _dry_run_create(dynamic, child)
            except ApiException as exc:
                raise AssertionError(
                    f"the API server refused a {child['kind']} of {spec}: {exc.body}"
                ) from exc
        image = children[0]["spec"]["template"]["spec"]["containers"][0]["image"]
        assert IMAGE_REFERENCE.fullmatch(image), f"{spec} admitted an image no runtime can pull: {image!r}"
        environment = _server_environment(children[0], secrets)
        clean = {key: value for key, value in os.environ.items() if not key.startswith("ZIMAGE_")}
        with mock.patch.dict(os.environ, {**clean, **environment}, clear=True):
            load_settings([])

    check()
    print(f"{len(admitted)} admitted, {len(refused)} refused")
    # Both sides of the limits were drawn: a test of nothing but refusals would prove nothing.
    assert len(admitted) >= 30
    assert len(refused) >= 30
