"""The ZImageService spec as typed models.

The API server validates and defaults the spec with the CRD's schema; these models repeat the
defaults (so builders can be tested without a cluster) and catch what the schema cannot, such
as a model source the operator cannot serve. They ignore unknown fields: the CRD is the
authority on what a manifest may hold.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_MODEL = "hf://Tongyi-MAI/Z-Image-Turbo"

# What the server may replay as CUDA graphs (its cuda_graph_parts), and its default.
GraphPart = Literal["text_encoder", "transformer"]
DEFAULT_GRAPH_PARTS: tuple[GraphPart, ...] = ("text_encoder",)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class SecretKeyRef(_Model):
    name: str
    key: str = "token"


class ModelCache(_Model):
    size: str = "40Gi"
    storage_class_name: str | None = Field(None, alias="storageClassName")
    access_modes: list[str] = Field(default_factory=lambda: ["ReadWriteMany"], alias="accessModes")


class ModelSpec(_Model):
    source: str = DEFAULT_MODEL
    revision: str = "main"
    token_secret_ref: SecretKeyRef | None = Field(None, alias="tokenSecretRef")
    cache: ModelCache | None = None

    @property
    def scheme(self) -> str:
        return self.source.split("://", 1)[0]

    @property
    def hub_source(self) -> str:
        """``hf://OWNER/NAME@REVISION``, the revision made explicit."""
        return self.source if "@" in self.source else f"{self.source}@{self.revision}"


class LoraSpec(_Model):
    name: str
    source: str
    scale: float = 1.0

    @property
    def scheme(self) -> str:
        return self.source.split("://", 1)[0]


class CompileArtifacts(_Model):
    enabled: bool = False
    claim_name: str | None = Field(None, alias="claimName")


class RuntimeSpec(_Model):
    image: str | None = None
    image_pull_policy: str | None = Field(None, alias="imagePullPolicy")
    precision: Literal["bf16", "fp8"] = "bf16"
    attention_backend: str = Field("auto", alias="attentionBackend")
    compile: bool = True
    compile_artifacts: CompileArtifacts = Field(default_factory=CompileArtifacts, alias="compileArtifacts")
    cuda_graphs: list[GraphPart] = Field(
        default_factory=lambda: list(DEFAULT_GRAPH_PARTS), alias="cudaGraphs"
    )
    max_batch_size: int = Field(4, alias="maxBatchSize")
    batch_wait_ms: int = Field(10, alias="batchWaitMs")
    batch_linger_ms: int = Field(100, alias="batchLingerMs")
    max_queue: int = Field(32, alias="maxQueue")
    request_timeout_seconds: int = Field(120, alias="requestTimeoutSeconds")
    warmup_sizes: list[str] = Field(default_factory=lambda: ["1024x1024"], alias="warmupSizes")
    log_level: str = Field("info", alias="logLevel")
    playground: bool = True


class ResourcesSpec(_Model):
    gpus: int = 1
    gpu_resource_name: str = Field("nvidia.com/gpu", alias="gpuResourceName")
    memory: str = "48Gi"
    cpu: str = "8"


class ParallelismSpec(_Model):
    workers: int | None = None
    sequence_parallel: int = Field(1, alias="sequenceParallel")


class VramSpec(_Model):
    limit: str = "90%"
    scope: Literal["process", "device"] = "process"
    period_seconds: int = Field(10, alias="periodSeconds")
    failure_threshold: int = Field(3, alias="failureThreshold")
    source: Literal["nvml", "file"] = "nvml"


class AutoscalingSpec(_Model):
    mode: Literal["builtin", "hpa", "keda", "none"] = "builtin"
    min_replicas: int = Field(1, alias="minReplicas")
    max_replicas: int = Field(4, alias="maxReplicas")
    target_queue_per_replica: int = Field(4, alias="targetQueuePerReplica")
    scale_down_stabilization_seconds: int = Field(300, alias="scaleDownStabilizationSeconds")


class SchedulingSpec(_Model):
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    affinity: dict[str, Any] = Field(default_factory=dict)
    priority_class_name: str | None = Field(None, alias="priorityClassName")
    runtime_class_name: str | None = Field(None, alias="runtimeClassName")


class ServiceSpec(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = 80


class DisruptionSpec(_Model):
    max_unavailable: int | str = Field(1, alias="maxUnavailable")


class NetworkPolicySpec(_Model):
    enabled: bool = True


class ApiKeySecretRef(SecretKeyRef):
    key: str = "keys"


class AuthSpec(_Model):
    api_key_secret_ref: ApiKeySecretRef | None = Field(None, alias="apiKeySecretRef")


class ZImageServiceSpec(_Model):
    model: ModelSpec = Field(default_factory=ModelSpec)
    loras: list[LoraSpec] = Field(default_factory=list)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    vram: VramSpec = Field(default_factory=VramSpec)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    replicas: int = 1
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    disruption: DisruptionSpec = Field(default_factory=DisruptionSpec)
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec, alias="networkPolicy")
    auth: AuthSpec = Field(default_factory=AuthSpec)

    @property
    def needs_cache(self) -> bool:
        return self.model.scheme == "hf" and self.model.cache is not None

    @property
    def hub_loras(self) -> list[LoraSpec]:
        """The adapters fetched from the Hub: into the model cache by the prefetch Job, if any."""
        return [lora for lora in self.loras if lora.scheme == "hf"]

    @property
    def scales_from_zero(self) -> bool:
        """keda mode with minReplicas 0: KEDA's HTTP add-on scales the service, from zero too."""
        return self.autoscaling.mode == "keda" and self.autoscaling.min_replicas == 0

    @property
    def on_cpu(self) -> bool:
        """``resources.gpus: 0``: a replica without a GPU, for tiny models in demos and tests."""
        return self.resources.gpus == 0

    @property
    def workers(self) -> int:
        """Pipeline workers in each replica: one per GPU, or one driving them all in sequence parallel."""
        if self.parallelism.sequence_parallel > 1:
            return 1
        return max(self.resources.gpus, 1)


# The sides the server accepts by default (its min_size and max_size), in multiples of 16.
MIN_SIDE, MAX_SIDE = 256, 2048


def _server_side(side: int) -> bool:
    return side % 16 == 0 and MIN_SIDE <= side <= MAX_SIDE


# The most GPUs one replica asks for: one node's.
MAX_GPUS = 8

# What the CRD admits for spec.loras (the server checks the same names and scales).
MAX_LORAS = 16
LORA_NAME = re.compile(r"[a-z0-9]([-a-z0-9._]{0,61}[a-z0-9])?")
LORA_SOURCE = re.compile(
    r"hf://[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(/[^@\s]+)?(@[A-Za-z0-9_./-]+)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/\S+|file:///\S+"
)
LORA_SCALE = (-2.0, 2.0)
SERVED_MODEL_NAME = "z-image-turbo"  # the server's first served model name, which a request may name

# An image reference as container runtimes parse it: [REGISTRY[:PORT]/]PATH[:TAG][@DIGEST], the
# path in lower case (the CRD holds the same expression).
_DOMAIN_PART = r"([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_PART = r"[a-z0-9]+(([.]|_|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(
    rf"({_DOMAIN_PART}([.]{_DOMAIN_PART})*(:[0-9]+)?/)?{_PATH_PART}(/{_PATH_PART})*"
    r"(:[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,127})?(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)


class InvalidSpecError(ValueError):
    """A spec the schema admitted but the operator cannot act on; becomes a Degraded condition."""


def parse_spec(raw: dict[str, Any] | None) -> ZImageServiceSpec:
    try:
        spec = ZImageServiceSpec.model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidSpecError(f"spec.{where}: {first['msg']}") from None
    if spec.model.scheme not in ("hf", "pvc", "file", "builtin"):
        raise InvalidSpecError(f"spec.model.source: unsupported scheme in {spec.model.source!r}")
    if spec.model.scheme == "pvc" and not spec.model.source.removeprefix("pvc://").split("/", 1)[0]:
        raise InvalidSpecError("spec.model.source: pvc:// needs a claim name, as in pvc://CLAIM/PATH")
    # The CRD refuses these at apply; a resource stored under an older CRD may still hold them.
    for size in spec.runtime.warmup_sizes:
        width, _, height = size.partition("x")
        if not all(side.isdigit() and _server_side(int(side)) for side in (width, height)):
            raise InvalidSpecError(
                f"spec.runtime.warmupSizes: {size!r} is not a size the server accepts; "
                f"each side must be a multiple of 16 from {MIN_SIDE} to {MAX_SIDE}"
            )
    if "/../" in f"{spec.model.source}/":
        raise InvalidSpecError("spec.model.source: a path must not contain '..'")
    image = spec.runtime.image
    if image and not IMAGE_REFERENCE.fullmatch(image):
        raise InvalidSpecError(
            f"spec.runtime.image: {image!r} is not an image reference: "
            "[REGISTRY[:PORT]/]PATH[:TAG][@ALGORITHM:DIGEST], the path in lower case"
        )
    for where, ref in (
        ("model.tokenSecretRef", spec.model.token_secret_ref),
        ("auth.apiKeySecretRef", spec.auth.api_key_secret_ref),
    ):
        if ref is not None and ref.key in (".", ".."):
            raise InvalidSpecError(f"spec.{where}.key: a Secret key cannot be '.' or '..'")
    if spec.vram.source == "file" and spec.resources.gpus > 0:
        raise InvalidSpecError(
            "spec.vram.source: file is a drill that replaces the GPU's own memory figures with a file, "
            "which would leave a GPU service without its VRAM guard: use it with resources.gpus 0"
        )
    if not 0 <= spec.resources.gpus <= MAX_GPUS:
        raise InvalidSpecError(f"spec.resources.gpus: from 0 (the CPU) to {MAX_GPUS} (one node's GPUs)")
    _check_parallelism(spec)
    _check_loras(spec)
    if spec.on_cpu and (spec.runtime.compile or spec.runtime.precision != "bf16"):
        raise InvalidSpecError(
            "spec.resources.gpus: 0 runs the server on the CPU, which needs runtime.compile false "
            "and runtime.precision bf16"
        )
    artifacts = spec.runtime.compile_artifacts
    if artifacts.enabled and not spec.runtime.compile:
        raise InvalidSpecError(
            "spec.runtime.compileArtifacts: shares what compile makes; set runtime.compile true"
        )
    if artifacts.enabled and artifacts.claim_name is None and not spec.needs_cache:
        raise InvalidSpecError(
            "spec.runtime.compileArtifacts: kept in the model cache unless claimName names a volume; "
            "add model.cache (hf:// sources) or set compileArtifacts.claimName"
        )
    if spec.autoscaling.min_replicas > spec.autoscaling.max_replicas:
        raise InvalidSpecError("spec.autoscaling: minReplicas must not exceed maxReplicas")
    if spec.autoscaling.min_replicas < 0:
        raise InvalidSpecError("spec.autoscaling.minReplicas: must not be negative")
    if spec.autoscaling.min_replicas == 0 and spec.autoscaling.mode != "keda":
        raise InvalidSpecError(
            "spec.autoscaling.minReplicas: 0 (scale from zero) needs mode keda, whose HTTP add-on holds "
            "requests while a replica starts; the builtin autoscaler and an HPA read the load of "
            "running pods, so with none nothing would scale the service up again"
        )
    if spec.autoscaling.min_replicas == 0 and spec.replicas != 0:
        raise InvalidSpecError(
            "spec.replicas: autoscaling.minReplicas 0 needs replicas 0 too (replicas is a floor above "
            "minReplicas)"
        )
    return spec


def _check_parallelism(spec: ZImageServiceSpec) -> None:
    """The CRD's parallelism rules, for resources stored before them."""
    parallelism, gpus = spec.parallelism, spec.resources.gpus
    degree = parallelism.sequence_parallel
    if degree < 1 or (parallelism.workers is not None and parallelism.workers < 1):
        raise InvalidSpecError("spec.parallelism: workers and sequenceParallel are at least 1")
    if degree > 1 and degree != gpus:
        raise InvalidSpecError(
            f"spec.parallelism.sequenceParallel: {degree} spreads each image over {degree} GPUs; "
            f"set resources.gpus to {degree} (it is {gpus})"
        )
    if degree > 1 and "transformer" in spec.runtime.cuda_graphs:
        raise InvalidSpecError(
            "spec.runtime.cudaGraphs: sequence parallel cannot replay the transformer as CUDA graphs; "
            "remove transformer"
        )
    if parallelism.workers is not None and parallelism.workers != spec.workers:
        raise InvalidSpecError(
            f"spec.parallelism.workers: a replica runs one worker per GPU, {spec.workers} with "
            f"resources.gpus {gpus}"
            + (" and sequenceParallel above 1" if degree > 1 else "")
            + "; leave workers out or set it to that"
        )


def _check_loras(spec: ZImageServiceSpec) -> None:
    """The CRD's rules for spec.loras, for resources stored before them."""
    if len(spec.loras) > MAX_LORAS:
        raise InvalidSpecError(f"spec.loras: at most {MAX_LORAS} adapters")
    seen: set[str] = set()
    for index, lora in enumerate(spec.loras):
        where = f"spec.loras[{index}]"
        if not LORA_NAME.fullmatch(lora.name):
            raise InvalidSpecError(
                f"{where}.name: {lora.name!r} must be 1 to 63 lower-case letters, digits, '-', '.' or '_', "
                "starting and ending with a letter or digit"
            )
        if lora.name in seen:
            raise InvalidSpecError(f"{where}.name: {lora.name!r} is given twice")
        if lora.name == SERVED_MODEL_NAME:
            raise InvalidSpecError(
                f"{where}.name: {SERVED_MODEL_NAME} is the model's own name; choose another"
            )
        seen.add(lora.name)
        if not LORA_SOURCE.fullmatch(lora.source):
            raise InvalidSpecError(
                f"{where}.source: {lora.source!r} must be hf://OWNER/NAME[/FILE][@REVISION], "
                "pvc://CLAIM/PATH or file:///PATH"
            )
        if re.search(r"/[.][.](/|$|@)", lora.source):
            raise InvalidSpecError(f"{where}.source: a path must not contain '..'")
        if not LORA_SCALE[0] <= lora.scale <= LORA_SCALE[1]:
            raise InvalidSpecError(f"{where}.scale: must be between -2 and 2")
