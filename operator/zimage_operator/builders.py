"""Pure builders: (owner, spec, settings) -> the desired children as plain manifests.

Nothing here talks to the API server, so every property is unit-tested without a cluster.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from .config import OperatorSettings
from .spec import LoraSpec, ZImageServiceSpec

GROUP = "zimage.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ZImageService"
PLURAL = "zimageservices"

SERVER_PORT = 8000
PORT_NAME = "http"
# The probes go to a small separate process of the server's (ZIMAGE_HEALTH_PORT), which
# answers in about a millisecond even while the serving process is busy generating.
HEALTH_PORT = 8001
HEALTH_PORT_NAME = "health"
MODEL_DIR = "/models"
ARTIFACTS_DIR = "/compile-artifacts"  # a claim of its own (runtime.compileArtifacts.claimName)
HUB_CACHE_DIR = f"{MODEL_DIR}/hub"
PVC_MOUNT = f"{MODEL_DIR}/pvc"
ADAPTERS_DIR = "/adapters"  # each claim of a pvc:// adapter, read-only, at ADAPTERS_DIR/CLAIM
API_KEYS_DIR = "/etc/zimage/api-keys"  # the Secret of spec.auth.apiKeySecretRef
# The preStop pause lets endpoints drop the pod before the server starts refusing requests.
PRESTOP_SECONDS = 5
STARTUP_PERIOD_SECONDS = 10

Manifest = dict[str, Any]
# The longest ZImageService name (the CRD refuses longer ones): NAME-prefetch-0123abcd, the
# prefetch Job's name and so a label value, must fit in 63 characters.
MAX_NAME_LENGTH = 45
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str

    def reference(self) -> Manifest:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def name_problem(name: str) -> str | None:
    """Why children cannot be named after ``name``, or None. The CRD refuses such names at apply;
    one stored under an older CRD may still have one."""
    if len(name) > MAX_NAME_LENGTH or not _DNS_LABEL.match(name):
        return (
            f"metadata.name {name!r} cannot name the children: it must start with a letter, hold only "
            f"lower-case letters, digits and '-', and be at most {MAX_NAME_LENGTH} characters"
        )
    return None


def selector_labels(owner: Owner) -> dict[str, str]:
    """Labels that select the pods; never changed after creation (a selector is immutable)."""
    return {"app.kubernetes.io/name": "zimage-server", "app.kubernetes.io/instance": owner.name}


def image_tag(image: str) -> str:
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else "latest"


def common_labels(owner: Owner, image: str | None = None) -> dict[str, str]:
    labels = {
        **selector_labels(owner),
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/part-of": "zimage",
        "app.kubernetes.io/managed-by": "zimage-operator",
    }
    if image:
        labels["app.kubernetes.io/version"] = _label_value(image_tag(image))
    return labels


def _label_value(value: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in value)[:63]
    return cleaned.strip("-_.") or "unknown"


def _metadata(owner: Owner, name: str, labels: dict[str, str]) -> Manifest:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels,
        "ownerReferences": [owner.reference()],
    }


def cache_claim_name(owner: Owner) -> str:
    return f"{owner.name}-model-cache"


def prefetch_job_name(owner: Owner, spec: ZImageServiceSpec) -> str:
    """NAME-prefetch-<digest of the model and the Hub adapters>: a Job's template cannot change,
    so a new model or another Hub adapter gets a new Job."""
    fetched = [spec.model.hub_source, *(lora.source for lora in spec.hub_loras)]
    digest = hashlib.sha256(" ".join(fetched).encode()).hexdigest()[:8]
    return f"{owner.name}-prefetch-{digest}"


def endpoint(owner: Owner, spec: ZImageServiceSpec) -> str:
    return f"http://{owner.name}.{owner.namespace}.svc:{spec.service.port}"


def selector_string(owner: Owner) -> str:
    return ",".join(f"{key}={value}" for key, value in selector_labels(owner).items())


# -- the server pod ------------------------------------------------------------------------------


def server_image(spec: ZImageServiceSpec, settings: OperatorSettings) -> str:
    return spec.runtime.image or settings.default_server_image


def model_env(spec: ZImageServiceSpec) -> list[Manifest]:
    model = spec.model
    if model.scheme == "builtin":
        return [{"name": "ZIMAGE_MODEL", "value": model.source}]
    if model.scheme == "file":
        return [{"name": "ZIMAGE_MODEL", "value": model.source.removeprefix("file://")}]
    if model.scheme == "pvc":
        path = model.source.removeprefix("pvc://").partition("/")[2]
        return [{"name": "ZIMAGE_MODEL", "value": f"{PVC_MOUNT}/{path}".rstrip("/")}]
    env = [
        {"name": "ZIMAGE_MODEL", "value": model.hub_source},
        {"name": "ZIMAGE_HF_CACHE_DIR", "value": HUB_CACHE_DIR},
    ]
    if spec.needs_cache:
        # The prefetch Job filled the cache; the servers only read it.
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    elif model.token_secret_ref is not None:
        env.append(_token_env(spec))
    return env


def adapter_claims(spec: ZImageServiceSpec) -> list[str]:
    """The claims the pvc:// adapters are on, each mounted once."""
    return list(
        dict.fromkeys(
            lora.source.removeprefix("pvc://").partition("/")[0]
            for lora in spec.loras
            if lora.scheme == "pvc"
        )
    )


def adapter_path(source: str) -> str:
    """Where the server finds an adapter: an hf:// source as it is (the server resolves it in
    its Hub cache), a pvc:// one under its claim's mount, a file:// one as its path."""
    if source.startswith("pvc://"):
        claim, _, path = source.removeprefix("pvc://").partition("/")
        return f"{ADAPTERS_DIR}/{claim}/{path}"
    return source.removeprefix("file://") if source.startswith("file://") else source


def loras_env(loras: list[LoraSpec]) -> Manifest:
    """ZIMAGE_LORAS: the adapters as the server's setting, a JSON list."""
    value = [{"name": lora.name, "source": adapter_path(lora.source), "scale": lora.scale} for lora in loras]
    return {"name": "ZIMAGE_LORAS", "value": json.dumps(value, separators=(",", ":"))}


def _token_env(spec: ZImageServiceSpec) -> Manifest:
    ref = spec.model.token_secret_ref
    assert ref is not None
    return {"name": "ZIMAGE_HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def server_env(spec: ZImageServiceSpec) -> list[Manifest]:
    """The server's settings as ``ZIMAGE_*`` variables (see docs/server.md)."""
    runtime, vram = spec.runtime, spec.vram
    settings = {
        "ZIMAGE_HOST": "0.0.0.0",
        "ZIMAGE_PORT": str(SERVER_PORT),
        "ZIMAGE_HEALTH_PORT": str(HEALTH_PORT),
        # An explicit cuda: a GPU replica that finds no GPU fails at start, never crawls on the CPU.
        "ZIMAGE_DEVICE": "cpu" if spec.on_cpu else "cuda",
        "ZIMAGE_LOG_LEVEL": runtime.log_level,
        "ZIMAGE_PLAYGROUND": "true" if runtime.playground else "false",
        # One worker per GPU, or one rank per GPU making each image together.
        "ZIMAGE_WORKERS": str(spec.workers),
        "ZIMAGE_SEQUENCE_PARALLEL": str(spec.parallelism.sequence_parallel),
        "ZIMAGE_MAX_BATCH_SIZE": str(runtime.max_batch_size),
        "ZIMAGE_BATCH_WAIT_MS": str(runtime.batch_wait_ms),
        "ZIMAGE_BATCH_LINGER_MS": str(runtime.batch_linger_ms),
        "ZIMAGE_MAX_QUEUE": str(runtime.max_queue),
        "ZIMAGE_REQUEST_TIMEOUT_S": str(runtime.request_timeout_seconds),
        "ZIMAGE_WARMUP_SIZES": ",".join(runtime.warmup_sizes),
        "ZIMAGE_PRECISION": runtime.precision,
        "ZIMAGE_ATTENTION_BACKEND": runtime.attention_backend,
        "ZIMAGE_COMPILE": "true" if runtime.compile else "false",
        # Only the parts: the server turns graphs on where it finds a GPU; none listed, none made.
        "ZIMAGE_CUDA_GRAPH_PARTS": ",".join(runtime.cuda_graphs),
        "ZIMAGE_VRAM_LIMIT": vram.limit,
        "ZIMAGE_VRAM_SCOPE": vram.scope,
        "ZIMAGE_VRAM_SOURCE": vram.source,
        "ZIMAGE_CACHE_DIR": "/tmp/zimage",
        # /tmp is an emptyDir: it outlives container restarts, so a restarted server skips the compile.
        "ZIMAGE_COMPILE_CACHE_DIR": "/tmp/zimage/compile",
        "HF_HOME": "/tmp/hf-home",
    }
    env: list[Manifest] = [{"name": key, "value": value} for key, value in settings.items()]
    env.extend(model_env(spec))
    if spec.loras:
        env.append(loras_env(spec.loras))
    artifacts = runtime.compile_artifacts
    if artifacts.enabled:
        # Beside the weights in the model cache, or in a claim of its own; every replica mounts it.
        directory = ARTIFACTS_DIR if artifacts.claim_name else f"{MODEL_DIR}/compile-artifacts"
        env.append({"name": "ZIMAGE_COMPILE_ARTIFACTS_DIR", "value": directory})
    if spec.auth.api_key_secret_ref is not None:
        ref = spec.auth.api_key_secret_ref
        # The server reads the keys from the mounted file, which the kubelet updates in place,
        # so keys rotate without a restart. The variable is its fallback, and what makes a
        # missing Secret or key a CreateContainerConfigError the status reports (a missing
        # volume only leaves the pod waiting in ContainerCreating).
        env.append({"name": "ZIMAGE_API_KEYS_FILE", "value": f"{API_KEYS_DIR}/keys"})
        env.append(
            {"name": "ZIMAGE_API_KEYS", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    return env


def _volumes(owner: Owner, spec: ZImageServiceSpec) -> tuple[list[Manifest], list[Manifest]]:
    volumes: list[Manifest] = [
        # PyTorch's and NCCL's shared memory (NCCL's transport between the GPUs of a replica
        # goes through it where the GPUs have no direct path): counted in the pod's memory.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shared_memory_gib(spec)}Gi"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[Manifest] = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    scheme = spec.model.scheme
    if scheme == "hf":
        if spec.needs_cache:
            source: Manifest = {"persistentVolumeClaim": {"claimName": cache_claim_name(owner)}}
        else:
            source = {"emptyDir": {}}
        volumes.append({"name": "model-cache", **source})
        mounts.append({"name": "model-cache", "mountPath": MODEL_DIR})
    elif scheme == "pvc":
        claim = spec.model.source.removeprefix("pvc://").partition("/")[0]
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": PVC_MOUNT, "readOnly": True})
    for index, claim in enumerate(adapter_claims(spec)):
        volumes.append(
            {"name": f"adapters-{index}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
        mounts.append({"name": f"adapters-{index}", "mountPath": f"{ADAPTERS_DIR}/{claim}", "readOnly": True})
    artifacts_claim = spec.runtime.compile_artifacts.claim_name
    if spec.runtime.compile_artifacts.enabled and artifacts_claim:
        volumes.append({"name": "compile-artifacts", "persistentVolumeClaim": {"claimName": artifacts_claim}})
        mounts.append({"name": "compile-artifacts", "mountPath": ARTIFACTS_DIR})
    if spec.auth.api_key_secret_ref is not None:
        ref = spec.auth.api_key_secret_ref
        secret = {"secretName": ref.name, "items": [{"key": ref.key, "path": "keys"}], "defaultMode": 0o444}
        volumes.append({"name": "api-keys", "secret": secret})
        mounts.append({"name": "api-keys", "mountPath": API_KEYS_DIR, "readOnly": True})
    return volumes, mounts


def shared_memory_gib(spec: ZImageServiceSpec) -> int:
    """/dev/shm's size: 8Gi, and 2Gi more for each GPU past the first."""
    return 8 + 2 * max(0, spec.resources.gpus - 1)


def startup_budget_seconds(spec: ZImageServiceSpec) -> int:
    """How long a replica may take to become ready before the kubelet restarts it: what its
    start has to do, with room to spare. Loading the weights and a warm-up without compile take
    seconds to a minute. With compile, a replica is ready once its weights are loaded and
    compiles after that, serving uncompiled meanwhile (the server's serve_while_compiling),
    except with sequence parallelism: its ranks warm up, compiles included, before they are
    ready, and one that finds no compile artifacts for its GPU and versions compiles from
    nothing, which took 193 s for bf16 on an H200 and over 9 minutes for fp8 on a fresh card
    (docs/performance.md), each further warm-up size its own shapes. A model the server
    downloads itself (hf:// without model.cache) comes over the network first."""
    budget = 600
    if spec.runtime.compile and spec.parallelism.sequence_parallel > 1:
        budget = 1800 if spec.runtime.precision == "fp8" else 900
        budget += 120 * max(0, len(spec.runtime.warmup_sizes) - 1)
    if spec.model.scheme == "hf" and not spec.needs_cache:
        budget += 1800
    return budget


def _probe(path: str, period: int, failures: int, timeout: int = 5) -> Manifest:
    return {
        "httpGet": {"path": path, "port": HEALTH_PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def container_security_context() -> Manifest:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context(settings: OperatorSettings) -> Manifest:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.server_uid,
        "runAsGroup": settings.server_uid,
        "fsGroup": settings.server_uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def termination_grace_seconds(spec: ZImageServiceSpec) -> int:
    """Long enough for the preStop pause plus a request that just started to finish."""
    return PRESTOP_SECONDS + spec.runtime.request_timeout_seconds + 10


def build_deployment(
    owner: Owner, spec: ZImageServiceSpec, settings: OperatorSettings, replicas: int | None
) -> Manifest:
    """``replicas`` None leaves the count to another owner (a HorizontalPodAutoscaler)."""
    image = server_image(spec, settings)
    volumes, mounts = _volumes(owner, spec)
    gpu = {} if spec.on_cpu else {spec.resources.gpu_resource_name: str(spec.resources.gpus)}
    container: Manifest = {
        "name": "server",
        "image": image,
        "args": ["serve"],
        "ports": [
            {"name": PORT_NAME, "containerPort": SERVER_PORT, "protocol": "TCP"},
            {"name": HEALTH_PORT_NAME, "containerPort": HEALTH_PORT, "protocol": "TCP"},
        ],
        "env": server_env(spec),
        "resources": {
            "requests": {"cpu": spec.resources.cpu, "memory": spec.resources.memory, **gpu},
            "limits": {"memory": spec.resources.memory, **gpu},
        },
        "startupProbe": _probe(
            "/healthz/startup", STARTUP_PERIOD_SECONDS, startup_budget_seconds(spec) // STARTUP_PERIOD_SECONDS
        ),
        "readinessProbe": _probe("/healthz/ready", 5, 2),
        "livenessProbe": _probe("/healthz/live", spec.vram.period_seconds, spec.vram.failure_threshold),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SECONDS}}},
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.runtime.image_pull_policy:
        container["imagePullPolicy"] = spec.runtime.image_pull_policy
    pod_spec: Manifest = {
        "containers": [container],
        "volumes": volumes,
        "securityContext": pod_security_context(settings),
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
    }
    scheduling = spec.scheduling
    if scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod_spec["tolerations"] = list(scheduling.tolerations)
    if scheduling.affinity:
        pod_spec["affinity"] = dict(scheduling.affinity)
    if scheduling.priority_class_name:
        pod_spec["priorityClassName"] = scheduling.priority_class_name
    if scheduling.runtime_class_name:
        pod_spec["runtimeClassName"] = scheduling.runtime_class_name
    labels = common_labels(owner, image)
    deployment: Manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, owner.name, labels),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(owner)},
            # maxSurge 0: an upgrade replaces pods in place and never needs a spare GPU.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "revisionHistoryLimit": 3,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
    if replicas is None:
        del deployment["spec"]["replicas"]
    return deployment


# The Pods metric an HPA scales on; a metrics adapter (such as prometheus-adapter) serves it
# from the servers' /metrics.
HPA_METRIC = "zimage_queue_depth"


def build_hpa(owner: Owner, spec: ZImageServiceSpec) -> Manifest:
    scaling = spec.autoscaling
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(owner, owner.name, common_labels(owner)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name},
            "minReplicas": replica_floor(spec),
            "maxReplicas": scaling.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": HPA_METRIC},
                        "target": {
                            "type": "AverageValue",
                            "averageValue": str(scaling.target_queue_per_replica),
                        },
                    },
                }
            ],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0},
                "scaleDown": {
                    "stabilizationWindowSeconds": scaling.scale_down_stabilization_seconds,
                    "policies": [{"type": "Percent", "value": 50, "periodSeconds": 30}],
                },
            },
        },
    }


KEDA_CRD = "scaledobjects.keda.sh"


def build_scaled_object(owner: Owner, spec: ZImageServiceSpec, settings: OperatorSettings) -> Manifest:
    """A KEDA ScaledObject with a Prometheus trigger on the servers' queue depth."""
    scaling = spec.autoscaling
    query = (
        f'sum(zimage_queue_depth{{namespace="{owner.namespace}",pod=~"{owner.name}-[a-z0-9]+-[a-z0-9]+"}})'
    )
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(owner, owner.name, common_labels(owner)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": owner.name},
            "minReplicaCount": replica_floor(spec),
            "maxReplicaCount": scaling.max_replicas,
            "cooldownPeriod": scaling.scale_down_stabilization_seconds,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleDown": {"stabilizationWindowSeconds": scaling.scale_down_stabilization_seconds}
                    }
                }
            },
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": settings.keda_prometheus_address,
                        "query": query,
                        "threshold": str(scaling.target_queue_per_replica),
                    },
                }
            ],
        },
    }


HTTP_ADDON_CRD = "httpscaledobjects.http.keda.sh"


def service_hosts(owner: Owner) -> list[str]:
    """The names a client in the cluster reaches the Service by: the HTTP add-on's interceptor
    routes a request to this service when its Host header is one of them."""
    local = f"{owner.name}.{owner.namespace}"
    return [owner.name, local, f"{local}.svc", f"{local}.svc.cluster.local"]


def build_http_scaled_object(owner: Owner, spec: ZImageServiceSpec) -> Manifest:
    """Scale from zero (keda mode, minReplicas 0): KEDA's HTTP add-on counts the requests its
    interceptor holds or forwards, holds them while the first replica starts, and scales on
    their number (the requests queued or running, the same load the other modes read)."""
    scaling = spec.autoscaling
    return {
        "apiVersion": "http.keda.sh/v1alpha1",
        "kind": "HTTPScaledObject",
        "metadata": _metadata(owner, owner.name, common_labels(owner)),
        "spec": {
            "hosts": service_hosts(owner),
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": owner.name,
                "service": owner.name,
                "port": spec.service.port,
            },
            "replicas": {"min": scaling.min_replicas, "max": scaling.max_replicas},
            "scalingMetric": {"concurrency": {"targetValue": scaling.target_queue_per_replica}},
            "scaledownPeriod": scaling.scale_down_stabilization_seconds,
            "timeouts": {
                # A request that wakes the service waits for a replica as long as one may take to start.
                "conditionWait": f"{startup_budget_seconds(spec)}s",
                # Images are answered whole: the headers come when the image is done.
                "responseHeader": f"{spec.runtime.request_timeout_seconds + 10}s",
            },
        },
    }


def build_service(owner: Owner, spec: ZImageServiceSpec) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, owner.name, common_labels(owner)),
        "spec": {
            "type": spec.service.type,
            "selector": selector_labels(owner),
            "ports": [
                {"name": PORT_NAME, "port": spec.service.port, "targetPort": PORT_NAME, "protocol": "TCP"}
            ],
        },
    }


def build_pdb(owner: Owner, spec: ZImageServiceSpec) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, owner.name, common_labels(owner)),
        "spec": {
            "maxUnavailable": spec.disruption.max_unavailable,
            "selector": {"matchLabels": selector_labels(owner)},
        },
    }


def build_network_policy(owner: Owner) -> Manifest:
    """The server pods admit the serving port only, from anywhere. The health port stays open
    to the kubelet, which probes from the pod's own node: no NetworkPolicy can block that."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(owner, owner.name, common_labels(owner)),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner)},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": PORT_NAME}]}],
        },
    }


def build_cache_claim(owner: Owner, spec: ZImageServiceSpec) -> Manifest | None:
    cache = spec.model.cache
    if not spec.needs_cache or cache is None:
        return None
    claim: Manifest = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(owner, cache_claim_name(owner), common_labels(owner)),
        "spec": {"accessModes": list(cache.access_modes), "resources": {"requests": {"storage": cache.size}}},
    }
    if cache.storage_class_name:
        claim["spec"]["storageClassName"] = cache.storage_class_name
    return claim


def build_prefetch_job(owner: Owner, spec: ZImageServiceSpec, settings: OperatorSettings) -> Manifest | None:
    if not spec.needs_cache:
        return None
    env = [
        {"name": "ZIMAGE_MODEL", "value": spec.model.hub_source},
        {"name": "ZIMAGE_HF_CACHE_DIR", "value": HUB_CACHE_DIR},
        {"name": "HF_HOME", "value": "/tmp/hf-home"},
    ]
    if spec.hub_loras:  # fetched beside the model; the servers then find them offline
        env.append(loras_env(spec.hub_loras))
    if spec.model.token_secret_ref is not None:
        env.append(_token_env(spec))
    labels = {**common_labels(owner), "app.kubernetes.io/component": "model-prefetch"}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(owner, prefetch_job_name(owner, spec), labels),
        "spec": {
            "backoffLimit": 4,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/component": "model-prefetch"}},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "securityContext": pod_security_context(settings),
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "prefetch",
                            "image": server_image(spec, settings),
                            "args": ["prefetch"],
                            "env": env,
                            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
                            "securityContext": container_security_context(),
                            "volumeMounts": [
                                {"name": "model-cache", "mountPath": MODEL_DIR},
                                {"name": "tmp", "mountPath": "/tmp"},
                            ],
                        }
                    ],
                    "volumes": [
                        {
                            "name": "model-cache",
                            "persistentVolumeClaim": {"claimName": cache_claim_name(owner)},
                        },
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def replica_floor(spec: ZImageServiceSpec) -> int:
    """The fewest replicas an autoscaler may choose: minReplicas, or ``spec.replicas`` where that
    is higher (``kubectl scale zis`` sets it), never above maxReplicas."""
    scaling = spec.autoscaling
    return min(scaling.max_replicas, max(scaling.min_replicas, spec.replicas))


def desired_replicas(spec: ZImageServiceSpec, current: int | None, model_ready: bool) -> int:
    """Replicas to ask of the Deployment. Zero until the model cache is filled."""
    if not model_ready:
        return 0
    if spec.autoscaling.mode == "none":
        return spec.replicas
    low, high = replica_floor(spec), spec.autoscaling.max_replicas
    start = low if current is None else current
    return max(low, min(high, start))
