"""The pure builders, one property per test, with no cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest

from zimage_operator import builders
from zimage_operator.builders import Owner
from zimage_operator.config import OperatorSettings
from zimage_operator.spec import parse_spec

OWNER = Owner(name="posters", namespace="ml", uid="1234")
SETTINGS = OperatorSettings(_env_file=None, default_server_image="zimage/zimage-server:9.9")


def deployment(spec: dict[str, Any] | None = None, replicas: int = 1) -> dict[str, Any]:
    return builders.build_deployment(OWNER, parse_spec(spec), SETTINGS, replicas)


def container(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = deployment(spec)["spec"]["template"]["spec"]["containers"][0]
    return result


def env(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container(spec)["env"]}


def pod_spec(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    result: dict[str, Any] = deployment(spec)["spec"]["template"]["spec"]
    return result


def test_the_server_image_comes_from_the_spec() -> None:
    assert (
        container({"runtime": {"image": "r.example/zimage-server:2"}})["image"] == "r.example/zimage-server:2"
    )


def test_an_empty_image_takes_the_operators_default() -> None:
    assert container()["image"] == "zimage/zimage-server:9.9"


def test_runtime_settings_become_zimage_env() -> None:
    values = env(
        {
            "runtime": {
                "maxBatchSize": 8,
                "batchWaitMs": 20,
                "batchLingerMs": 250,
                "cudaGraphs": ["transformer", "text_encoder"],
                "maxQueue": 64,
                "requestTimeoutSeconds": 30,
                "warmupSizes": ["512x512", "1024x1024"],
            }
        }
    )
    assert values["ZIMAGE_MAX_BATCH_SIZE"] == "8"
    assert (values["ZIMAGE_BATCH_WAIT_MS"], values["ZIMAGE_BATCH_LINGER_MS"]) == ("20", "250")
    assert values["ZIMAGE_CUDA_GRAPH_PARTS"] == "transformer,text_encoder"
    assert values["ZIMAGE_MAX_QUEUE"] == "64"
    assert values["ZIMAGE_REQUEST_TIMEOUT_S"] == "30"
    assert values["ZIMAGE_WARMUP_SIZES"] == "512x512,1024x1024"
    assert values["ZIMAGE_HOST"] == "0.0.0.0"
    assert values["ZIMAGE_PLAYGROUND"] == "true"
    assert env({"runtime": {"playground": False}})["ZIMAGE_PLAYGROUND"] == "false"


def test_every_variable_the_operator_sets_is_a_server_setting_it_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A misspelt variable would be ignored by the server without a word: each must name a
    setting, and the server must accept the values the operator writes."""
    from zimage_server.core.config import Settings

    values = env({"runtime": {"batchLingerMs": 250}, "vram": {"limit": "90%"}})
    names = {name.removeprefix("ZIMAGE_").lower() for name in values if name.startswith("ZIMAGE_")}
    # ZIMAGE_CACHE_DIR is where the built-in tiny model is built (read by tiny_model.py).
    assert names - set(Settings.model_fields) == {"cache_dir"}
    for name, value in values.items():
        if name.startswith("ZIMAGE_") and isinstance(value, str):
            monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    assert (settings.batch_linger_ms, settings.vram_limit, settings.port) == (250, "90%", 8000)


def test_cuda_graphs_default_to_the_text_encoder_and_an_empty_list_turns_them_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from zimage_server.core.config import Settings

    assert env()["ZIMAGE_CUDA_GRAPH_PARTS"] == "text_encoder"
    # Graphs stay the server's choice (on where it finds a GPU), so a CPU pod still starts.
    assert "ZIMAGE_CUDA_GRAPHS" not in env()
    none = env({"runtime": {"cudaGraphs": []}})["ZIMAGE_CUDA_GRAPH_PARTS"]
    monkeypatch.setenv("ZIMAGE_CUDA_GRAPH_PARTS", none)
    assert Settings(_env_file=None).cuda_graph_parts == []


def test_vram_settings_reach_the_server() -> None:
    values = env({"vram": {"limit": "70Gi", "scope": "device"}})
    assert (values["ZIMAGE_VRAM_LIMIT"], values["ZIMAGE_VRAM_SCOPE"]) == ("70Gi", "device")


def test_vram_drills_read_the_file_source() -> None:
    assert env()["ZIMAGE_VRAM_SOURCE"] == "nvml"
    drill = {"vram": {"source": "file"}, "resources": {"gpus": 0}, "runtime": {"compile": False}}
    assert env(drill)["ZIMAGE_VRAM_SOURCE"] == "file"


def test_a_cpu_replica_asks_for_no_gpu_and_runs_the_server_on_the_cpu() -> None:
    spec = {"resources": {"gpus": 0}, "runtime": {"compile": False}}
    assert container(spec)["resources"] == {
        "requests": {"cpu": "8", "memory": "48Gi"},
        "limits": {"memory": "48Gi"},
    }
    assert env(spec)["ZIMAGE_DEVICE"] == "cpu"
    assert env()["ZIMAGE_DEVICE"] == "cuda"


def test_gpus_are_limited_under_the_configured_resource_name() -> None:
    resources = container({"resources": {"gpus": 1, "gpuResourceName": "amd.com/gpu"}})["resources"]
    assert resources["limits"]["amd.com/gpu"] == "1"
    assert resources["requests"]["amd.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in resources["limits"]


def test_several_gpus_run_one_worker_each_by_default() -> None:
    spec = {"resources": {"gpus": 4}}
    assert container(spec)["resources"]["limits"]["nvidia.com/gpu"] == "4"
    values = env(spec)
    assert (values["ZIMAGE_WORKERS"], values["ZIMAGE_SEQUENCE_PARALLEL"]) == ("4", "1")
    assert (env()["ZIMAGE_WORKERS"], env()["ZIMAGE_SEQUENCE_PARALLEL"]) == ("1", "1")
    assert env({"resources": {"gpus": 0}, "runtime": {"compile": False}})["ZIMAGE_WORKERS"] == "1"


def test_sequence_parallel_makes_each_image_on_every_gpu_of_the_replica() -> None:
    spec = {"resources": {"gpus": 2}, "parallelism": {"sequenceParallel": 2}}
    values = env(spec)
    assert (values["ZIMAGE_WORKERS"], values["ZIMAGE_SEQUENCE_PARALLEL"]) == ("1", "2")
    assert container(spec)["resources"]["requests"]["nvidia.com/gpu"] == "2"


def test_shared_memory_grows_with_the_gpus_nccl_joins() -> None:
    def shm(gpus: int) -> str:
        volume = next(v for v in pod_spec({"resources": {"gpus": gpus}})["volumes"] if v["name"] == "dshm")
        return str(volume["emptyDir"]["sizeLimit"])

    assert [shm(1), shm(2), shm(8)] == ["8Gi", "10Gi", "22Gi"]


def test_cpu_and_memory_come_from_the_spec() -> None:
    resources = container({"resources": {"cpu": "4", "memory": "32Gi"}})["resources"]
    assert resources["requests"]["cpu"] == "4"
    assert resources["limits"]["memory"] == "32Gi"


def test_probes_use_the_servers_endpoints_on_its_health_port() -> None:
    main = container()
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz/startup"
    assert main["readinessProbe"]["httpGet"]["path"] == "/healthz/ready"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz/live"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert main[probe]["httpGet"]["port"] == "health"
    assert {"name": "health", "containerPort": 8001, "protocol": "TCP"} in main["ports"]
    assert {"name": "ZIMAGE_HEALTH_PORT", "value": "8001"} in main["env"]


def startup_budget(spec: dict[str, Any] | None = None) -> int:
    probe = container(spec)["startupProbe"]
    return int(probe["periodSeconds"] * probe["failureThreshold"])


def test_the_startup_probe_budget_follows_what_the_start_must_do() -> None:
    tiny = {"source": "builtin://tiny"}
    # With compile a replica is ready once loaded and compiles after that, serving uncompiled:
    # its budget is the load's, with or without compile, warm-up sizes or workers.
    plain = startup_budget({"model": tiny, "runtime": {"compile": False}})
    assert plain >= 300
    assert startup_budget({"model": tiny}) == plain
    assert startup_budget({"model": tiny, "runtime": {"precision": "fp8"}}) == plain
    assert startup_budget({"model": tiny, "runtime": {"warmupSizes": ["1024x1024", "768x768"]}}) == plain
    assert startup_budget({"model": tiny, "resources": {"gpus": 4}}) == plain
    # Sequence-parallel ranks compile before they are ready. A cold compile (no shared artifacts
    # for this GPU and these versions yet): 193 s for bf16 on an H200, over 9 minutes for fp8 on
    # a fresh card; each budget leaves room for it.
    parallel = {"model": tiny, "resources": {"gpus": 2}, "parallelism": {"sequenceParallel": 2}}
    bf16 = startup_budget(parallel)
    assert bf16 >= 4 * 193
    fp8 = startup_budget({**parallel, "runtime": {"precision": "fp8"}})
    assert fp8 >= 2 * 560
    assert fp8 > bf16
    assert startup_budget({**parallel, "runtime": {"compile": False}}) == plain
    two_sizes = {**parallel, "runtime": {"warmupSizes": ["1024x1024", "768x768"]}}
    assert startup_budget(two_sizes) > bf16
    # Shared artifacts do not shorten it: the first replica, and any after an upgrade, compile cold.
    shared = {"compileArtifacts": {"enabled": True, "claimName": "kernels"}}
    assert startup_budget({**parallel, "runtime": shared}) == bf16
    # A hub model without a cache is downloaded by the server itself, before it loads.
    downloading = startup_budget({"model": {"source": "hf://Tongyi-MAI/Z-Image-Turbo"}})
    cached = startup_budget({"model": {"source": "hf://Tongyi-MAI/Z-Image-Turbo", "cache": {"size": "40Gi"}}})
    assert downloading >= cached + 1800
    assert cached == plain


def test_scale_from_zero_is_an_http_scaled_object_on_the_service() -> None:
    spec = parse_spec(
        {
            "autoscaling": {"mode": "keda", "minReplicas": 0, "maxReplicas": 3, "targetQueuePerReplica": 2},
            "replicas": 0,
            "service": {"port": 8080},
            "runtime": {"requestTimeoutSeconds": 300},
        }
    )
    scaled = builders.build_http_scaled_object(OWNER, spec)
    assert (scaled["apiVersion"], scaled["kind"]) == ("http.keda.sh/v1alpha1", "HTTPScaledObject")
    body = scaled["spec"]
    assert body["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": OWNER.name,
        "service": OWNER.name,
        "port": 8080,
    }
    assert body["replicas"] == {"min": 0, "max": 3}
    assert body["scalingMetric"] == {"concurrency": {"targetValue": 2}}
    assert f"{OWNER.name}.{OWNER.namespace}.svc.cluster.local" in body["hosts"]
    # The interceptor holds a waking request as long as a replica may take to start.
    assert body["timeouts"]["conditionWait"] == f"{builders.startup_budget_seconds(spec)}s"
    assert body["timeouts"]["responseHeader"] == "310s"
    assert scaled["metadata"]["ownerReferences"][0]["kind"] == "ZImageService"


def test_liveness_timing_comes_from_the_vram_spec() -> None:
    probe = container({"vram": {"periodSeconds": 7, "failureThreshold": 4}})["livenessProbe"]
    assert (probe["periodSeconds"], probe["failureThreshold"]) == (7, 4)


def test_a_prestop_pause_and_grace_period_cover_the_request_timeout() -> None:
    assert container()["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert pod_spec({"runtime": {"requestTimeoutSeconds": 300}})["terminationGracePeriodSeconds"] > 300


def test_the_security_context_is_restricted() -> None:
    pod = pod_spec()
    main = pod["containers"][0]["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert main["allowPrivilegeEscalation"] is False
    assert main["capabilities"] == {"drop": ["ALL"]}
    assert main["readOnlyRootFilesystem"] is True


def test_dev_shm_is_a_memory_backed_empty_dir() -> None:
    pod = pod_spec()
    volume = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert volume["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_a_cached_hub_model_mounts_the_cache_claim_read_offline() -> None:
    spec = {"model": {"source": "hf://Tongyi-MAI/Z-Image-Turbo", "cache": {"size": "50Gi"}}}
    volume = next(v for v in pod_spec(spec)["volumes"] if v["name"] == "model-cache")
    assert volume["persistentVolumeClaim"]["claimName"] == "posters-model-cache"
    assert env(spec)["HF_HUB_OFFLINE"] == "1"
    assert env(spec)["ZIMAGE_MODEL"] == "hf://Tongyi-MAI/Z-Image-Turbo@main"


def test_compile_artifacts_live_beside_the_weights_in_the_model_cache() -> None:
    spec = {
        "model": {"source": "hf://Tongyi-MAI/Z-Image-Turbo", "cache": {}},
        "runtime": {"compileArtifacts": {"enabled": True}},
    }
    assert env(spec)["ZIMAGE_COMPILE_ARTIFACTS_DIR"] == "/models/compile-artifacts"
    mount = next(m for m in container(spec)["volumeMounts"] if m["name"] == "model-cache")
    assert mount["mountPath"] == "/models"
    assert not mount.get("readOnly"), "replicas write the artifacts they compiled"
    assert "ZIMAGE_COMPILE_ARTIFACTS_DIR" not in env({"model": {"source": "hf://o/m", "cache": {}}})


def test_compile_artifacts_in_a_claim_of_their_own_are_mounted_read_write() -> None:
    spec = {"runtime": {"compileArtifacts": {"enabled": True, "claimName": "kernels"}}}
    assert env(spec)["ZIMAGE_COMPILE_ARTIFACTS_DIR"] == "/compile-artifacts"
    pod = pod_spec(spec)
    volume = next(v for v in pod["volumes"] if v["name"] == "compile-artifacts")
    assert volume["persistentVolumeClaim"] == {"claimName": "kernels"}
    mounts = pod["containers"][0]["volumeMounts"]
    assert {"name": "compile-artifacts", "mountPath": "/compile-artifacts"} in mounts


def test_an_uncached_hub_model_downloads_into_an_empty_dir_with_the_token() -> None:
    spec = {"model": {"source": "hf://o/m@v2", "tokenSecretRef": {"name": "hf", "key": "tok"}}}
    volume = next(v for v in pod_spec(spec)["volumes"] if v["name"] == "model-cache")
    assert volume == {"name": "model-cache", "emptyDir": {}}
    assert env(spec)["ZIMAGE_HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}
    assert env(spec)["ZIMAGE_MODEL"] == "hf://o/m@v2"


def test_api_keys_are_a_mounted_file_so_that_they_rotate_without_a_restart() -> None:
    spec = {"auth": {"apiKeySecretRef": {"name": "team-keys", "key": "list"}}}
    volume = next(v for v in pod_spec(spec)["volumes"] if v["name"] == "api-keys")
    assert volume["secret"]["secretName"] == "team-keys"
    assert volume["secret"]["items"] == [{"key": "list", "path": "keys"}]
    (container,) = pod_spec(spec)["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert mount["readOnly"] is True
    assert env(spec)["ZIMAGE_API_KEYS_FILE"] == f"{mount['mountPath']}/keys"
    # The fallback, and what turns a missing Secret into a reported CreateContainerConfigError.
    assert env(spec)["ZIMAGE_API_KEYS"] == {"secretKeyRef": {"name": "team-keys", "key": "list"}}


def test_without_auth_no_keys_are_mounted() -> None:
    assert all(v["name"] != "api-keys" for v in pod_spec({})["volumes"])
    assert "ZIMAGE_API_KEYS_FILE" not in env({})
    assert "ZIMAGE_API_KEYS" not in env({})


def test_a_pvc_source_is_mounted_read_only() -> None:
    spec = {"model": {"source": "pvc://weights/z-image-turbo"}}
    volume = next(v for v in pod_spec(spec)["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"] == {"claimName": "weights", "readOnly": True}
    assert env(spec)["ZIMAGE_MODEL"] == "/models/pvc/z-image-turbo"


@pytest.mark.parametrize(
    ("source", "model"), [("builtin://tiny", "builtin://tiny"), ("file:///opt/zimage", "/opt/zimage")]
)
def test_builtin_and_file_sources_need_no_volume(source: str, model: str) -> None:
    spec = {"model": {"source": source}}
    assert env(spec)["ZIMAGE_MODEL"] == model
    assert {v["name"] for v in pod_spec(spec)["volumes"]} == {"dshm", "tmp"}


def test_scheduling_fields_are_copied() -> None:
    scheduling = {
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {}},
        "priorityClassName": "high",
        "runtimeClassName": "nvidia",
    }
    pod = pod_spec({"scheduling": scheduling})
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == scheduling["tolerations"]
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert (pod["priorityClassName"], pod["runtimeClassName"]) == ("high", "nvidia")


def test_a_rollout_never_needs_a_spare_gpu() -> None:
    assert deployment()["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0


def test_selector_labels_are_stable_and_apart_from_version_labels() -> None:
    old = deployment({"runtime": {"image": "zimage-server:1"}})
    new = deployment({"runtime": {"image": "zimage-server:2"}})
    assert old["spec"]["selector"] == new["spec"]["selector"]
    assert "app.kubernetes.io/version" not in old["spec"]["selector"]["matchLabels"]
    assert new["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == "2"


def test_children_are_owned_by_the_zimageservice() -> None:
    (ref,) = deployment()["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
        "ZImageService",
        "posters",
        "1234",
        True,
    )


def test_the_service_has_a_named_port_and_the_stable_selector() -> None:
    service = builders.build_service(OWNER, parse_spec({"service": {"port": 8080, "type": "LoadBalancer"}}))
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == builders.selector_labels(OWNER)
    assert service["spec"]["type"] == "LoadBalancer"


def test_the_pdb_comes_from_the_disruption_spec() -> None:
    pdb = builders.build_pdb(OWNER, parse_spec({"disruption": {"maxUnavailable": "25%"}}))
    assert pdb["spec"]["maxUnavailable"] == "25%"
    assert pdb["spec"]["selector"]["matchLabels"] == builders.selector_labels(OWNER)


def test_the_network_policy_admits_the_serving_port_only() -> None:
    policy = builders.build_network_policy(OWNER)
    assert policy["spec"]["podSelector"] == {"matchLabels": builders.selector_labels(OWNER)}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # From anywhere, to the port the Service targets; the health port is in no rule.
    assert policy["spec"]["ingress"] == [{"ports": [{"protocol": "TCP", "port": builders.PORT_NAME}]}]
    service = builders.build_service(OWNER, parse_spec({}))
    assert service["spec"]["ports"][0]["targetPort"] == builders.PORT_NAME
    assert parse_spec({}).network_policy.enabled
    assert not parse_spec({"networkPolicy": {"enabled": False}}).network_policy.enabled


def test_a_cache_claim_is_built_only_for_a_cached_hub_model() -> None:
    assert builders.build_cache_claim(OWNER, parse_spec({"model": {"source": "builtin://tiny"}})) is None
    assert builders.build_cache_claim(OWNER, parse_spec({})) is None
    claim = builders.build_cache_claim(
        OWNER, parse_spec({"model": {"cache": {"size": "60Gi", "storageClassName": "fast"}}})
    )
    assert claim is not None
    assert claim["spec"]["resources"]["requests"]["storage"] == "60Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_the_prefetch_job_gets_the_token_by_reference_only() -> None:
    spec = parse_spec({"model": {"cache": {}, "tokenSecretRef": {"name": "hf-token"}}})
    job = builders.build_prefetch_job(OWNER, spec, SETTINGS)
    assert job is not None
    main = job["spec"]["template"]["spec"]["containers"][0]
    assert main["args"] == ["prefetch"]
    token = next(item for item in main["env"] if item["name"] == "ZIMAGE_HF_TOKEN")
    assert token == {
        "name": "ZIMAGE_HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
    }
    assert "hf-token" not in json.dumps(main["env"]).replace('"name": "hf-token"', "")


@pytest.mark.parametrize(
    ("autoscaling", "replicas", "current", "model_ready", "expected"),
    [
        ({"mode": "none"}, 3, None, True, 3),
        ({"mode": "builtin", "minReplicas": 2, "maxReplicas": 5}, 1, None, True, 2),
        ({"mode": "builtin", "minReplicas": 2, "maxReplicas": 5}, 1, 4, True, 4),
        ({"mode": "builtin", "minReplicas": 2, "maxReplicas": 5}, 1, 9, True, 5),
        ({"mode": "none"}, 3, None, False, 0),
    ],
)
def test_desired_replicas(
    autoscaling: dict[str, Any], replicas: int, current: int | None, model_ready: bool, expected: int
) -> None:
    spec = parse_spec({"autoscaling": autoscaling, "replicas": replicas})
    assert builders.desired_replicas(spec, current, model_ready) == expected


def test_the_hpa_scales_the_deployment_on_queue_depth() -> None:
    spec = parse_spec(
        {"autoscaling": {"mode": "hpa", "minReplicas": 2, "maxReplicas": 7, "targetQueuePerReplica": 3}}
    )
    hpa = builders.build_hpa(OWNER, spec)["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "posters"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 7)
    (metric,) = hpa["metrics"]
    assert metric["pods"]["metric"]["name"] == "zimage_queue_depth"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "3"}
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300


def test_a_deployment_under_an_hpa_leaves_replicas_alone() -> None:
    manifest = builders.build_deployment(OWNER, parse_spec({}), SETTINGS, None)
    assert "replicas" not in manifest["spec"]
