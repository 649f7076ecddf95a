"""Every server setting in one place: environment variables ``ZIMAGE_*`` or CLI flags."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from zimage_server.core.adapters import AdapterSetting, check_adapter_list
from zimage_server.core.choices import COMPILABLE, GRAPHABLE, check_attention_backend
from zimage_server.core.keys import parse_keys, read_key_file
from zimage_server.core.sources import ModelSource
from zimage_server.core.vram_limit import VramLimit

# ASCII digits only (\d would take fullwidth and other scripts' digits), the whole string.
# What the published schema's pattern admits: no leading zeros; "x" in either case.
SIZE_RE = re.compile(r"([1-9][0-9]{0,4})[xX]([1-9][0-9]{0,4})")
# The VAE downsamples by 8 and the transformer patches by 2: sides must be multiples of 16.
SIZE_MULTIPLE = 16


def _check_parts(setting: str, parts: list[str], allowed: tuple[str, ...]) -> None:
    for part in parts:
        if part not in allowed:
            raise ValueError(f"{setting}: {part!r} is not one of {', '.join(allowed)}")


def parse_size(value: str) -> tuple[int, int]:
    """Parse ``"WxH"`` into ``(width, height)``; raise ``ValueError`` with a readable message."""
    match = SIZE_RE.fullmatch(value)
    if not match:
        raise ValueError(f"size must look like '1024x1024' (width x height in pixels), got {value!r}")
    return int(match.group(1)), int(match.group(2))


class Settings(BaseSettings):
    """Z-Image inference server settings.

    Each field is read from the environment as ``ZIMAGE_<NAME>`` (for example
    ``ZIMAGE_MAX_BATCH_SIZE=4``) or given as a flag (``--max-batch-size 4``).
    """

    model_config = SettingsConfigDict(
        env_prefix="ZIMAGE_",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="zimage-server serve",
        cli_exit_on_error=True,
        extra="ignore",
    )

    model: str = Field(
        "builtin://tiny",
        description="Model source: builtin://tiny, a local directory, file:///PATH or hf://REPO[@REVISION]",
    )
    revision: str = Field("main", description="Hub revision when model is hf://REPO without @REVISION")
    hf_cache_dir: str | None = Field(None, description="Hugging Face cache directory (default: HF_HOME)")
    hf_token: SecretStr | None = Field(None, description="Hub token for gated or private repositories")
    prefetch_weights: bool = Field(
        False,
        description="Read the model's weight files into the page cache on a background thread from the "
        "process's start, while the server imports its libraries, so that a load slowed by its volume reads "
        "memory instead (a local directory, or a Hub cache with HF_HUB_OFFLINE set)",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Keys a client must send to the images API (one per line or comma-separated); "
        "unset (and no api_keys_file): no authentication. Health, load and metrics stay open",
    )
    api_keys_file: str | None = Field(
        None,
        description="A file of API keys, one per line, read again when it changes (a mounted Secret "
        "rotates without a restart); takes the place of api_keys",
    )
    served_model_names: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["z-image-turbo", "Tongyi-MAI/Z-Image-Turbo"],
        description="Names a request's 'model' field may use (comma-separated); the first is reported",
    )

    loras: list[AdapterSetting] = Field(
        default_factory=list,
        description='LoRA adapters loaded at start, as JSON: [{"name": "pixel-art", "source": '
        '"/models/pixel.safetensors", "scale": 0.8}]; a source is a .safetensors file (diffusers, kohya '
        "or ai-toolkit format), a folder holding pytorch_lora_weights.safetensors, file:///PATH or "
        'hf://OWNER/NAME[/FILE][@REVISION]. A request picks them with "lora" or as its model',
    )
    lora_max_per_request: int = Field(2, ge=1, le=8, description="Most adapters one request may combine")
    lora_max_rank: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="The rank ceiling the adapters are swapped into without recompiling: a request's "
        "adapters' ranks together. Default: the sum of the lora_max_per_request largest ranks loaded; "
        "an adapter above it is refused at load",
    )

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in a container)")
    port: int = Field(8000, ge=1, le=65535)
    health_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Also answer /healthz/* on this port from a small separate process, so probes never "
        "wait for the serving process (the operator uses 8001)",
    )
    health_stall_s: float = Field(
        30.0,
        gt=0,
        description="With health_port: liveness fails when the serving event loop stalls this long",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest request body; a larger one gets 413 before it is read"
    )
    request_read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request's head and body must arrive within this; then the connection closes",
    )
    send_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A client that leaves its answer unread this long (its write buffer full, or "
        "unsent after the response ended) is cut and the answer dropped",
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="An idle kept-alive connection closes after this"
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="Open connections on the serving port (kept below the descriptor limit); past it "
        "the address holding the most closes its oldest idle one, and only when all are busy does a "
        "new one get 503",
    )

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    workers: int | None = Field(
        None,
        ge=1,
        le=16,
        description="Pipeline workers behind the one queue, each on its own GPU (data parallel); a "
        "batch goes to the first free one. Default: one per visible GPU, one on the CPU",
    )
    sequence_parallel: int = Field(
        1,
        ge=1,
        le=16,
        description="GPUs that make each image together (Ulysses attention over the model's heads, "
        "one process per GPU); 1: off. Not with workers above 1",
    )
    parallel_port: int = Field(
        29500, ge=1, le=65535, description="Loopback port the sequence-parallel processes meet on"
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = bfloat16 on GPU, float32 on CPU"
    )

    precision: Literal["bf16", "fp8"] = Field(
        "bf16",
        description="fp8: the transformer's main blocks in float8 through torchao (GPU with compute "
        "capability 8.9+); embedders, refiners, modulation and the final layer stay bf16",
    )
    attention_backend: str = Field(
        "auto",
        description="auto: time the attention backends this GPU has at start-up and use the fastest; "
        "or a diffusers backend name (native, _native_cudnn, _native_flash, flash, _flash_3, ...)",
    )
    compile: bool | None = Field(
        None, description="torch.compile the pipeline (regional for the transformer); default: on for GPU"
    )
    compile_parts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["transformer", "vae", "text_encoder"],
        description="What compile covers (comma-separated): transformer, vae, text_encoder",
    )
    compile_batch_unbacked: bool = Field(
        False,
        description="Trace the transformer's block once for one image and several (the batch an unbacked "
        "size from the first call): fewer traces on the CPU; on an H100 with torch 2.11 the block cannot "
        "be traced so (it falls back per batch size, with a warning); images were 12% slower: leave it off",
    )
    serve_while_compiling: bool | None = Field(
        None,
        description="With compile: serve requests uncompiled (slower) as soon as the model is loaded, "
        "and switch to the compiled parts once a warm-up beside them has built them; false: warm up "
        "before ready. Default: on, except with sequence_parallel (its ranks warm up before ready)",
    )
    compile_cache_dir: str | None = Field(
        None,
        description="Directory for Inductor's and Triton's compile caches (a volume, so restarts skip most "
        "of the compile); default: torch's own under /tmp",
    )
    compile_artifacts_dir: str | None = Field(
        None,
        description="Directory shared by every replica (the model cache volume, for one) for compiled "
        "kernels: a replica loads the artifact saved for its GPU, versions, precision, compile parts and "
        "warm-up shapes before its warm-up, or saves one after it; off unless set, and only with compile",
    )

    cuda_graphs: bool | None = Field(
        None,
        description="Replay parts of the pipeline as CUDA graphs, one per input shape (GPU only); "
        "default: on for GPU",
    )
    cuda_graph_parts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["text_encoder"],
        description="What CUDA graphs cover (comma-separated): text_encoder, transformer (pays where the "
        "CPU limits and shapes repeat: small images, the same prompts)",
    )
    max_cuda_graphs: int = Field(32, ge=1, le=1024, description="Most input shapes kept as CUDA graphs")

    max_batch_size: int = Field(4, ge=1, le=64, description="Most images in one forward pass")
    batch_wait_ms: float = Field(10.0, ge=0, le=10_000, description="How long a batch waits to fill up")
    batch_linger_ms: float = Field(
        100.0,
        ge=0,
        le=10_000,
        description="Under load: how long after a batch ends the next one waits to fill up (clients just "
        "answered often send their next request within tens of milliseconds); at most 5% of the last "
        "batch's run time; 0: off",
    )
    max_queue: int = Field(32, ge=1, description="Requests allowed to wait; more get 429")
    request_timeout_s: float = Field(120.0, gt=0, description="Seconds from arrival to answer; then 504")

    max_edit_body_bytes: int = Field(
        25 * 1024 * 1024,
        ge=1024,
        description="Largest body of POST /v1/images/edits (the image, its mask and the fields); a larger "
        "one gets 413 before it is read",
    )
    max_upload_pixels: int = Field(
        4096 * 4096,
        ge=64 * 64,
        description="Most pixels an uploaded image or mask may have, checked from its header before it "
        "is decoded (a small file can hold a huge image)",
    )
    edit_strength: float = Field(
        0.6,
        gt=0,
        le=1,
        description="How much of an edit's image is redrawn when a request names no strength (image to "
        "image; inpainting redraws the masked area whole, 1.0); it runs that share of the steps",
    )

    min_size: int = Field(256, ge=SIZE_MULTIPLE, description="Smallest width or height in pixels")
    max_size: int = Field(2048, ge=SIZE_MULTIPLE, description="Largest width or height in pixels")
    default_size: str = "1024x1024"
    max_n: int = Field(4, ge=1, le=64, description="Most images in one request")
    default_steps: int = Field(8, ge=1, description="Denoising steps when a request names none")
    max_steps: int = Field(50, ge=1)
    max_prompt_chars: int = Field(4000, ge=1)

    warmup_sizes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["1024x1024"],
        description="Sizes generated once before ready (comma-separated)",
    )
    warmup_steps: int = Field(2, ge=1)
    playground: bool = Field(True, description="Serve the web playground at /")

    vram_limit: str | None = Field(
        None,
        description="Liveness fails above this GPU memory: bytes ('70Gi') or percent of the device ('90%')",
    )
    vram_source: Literal["nvml", "file"] = Field(
        "nvml",
        description="Where GPU memory figures come from: NVML, or a JSON file (vram_source_file) "
        "written by hand, to drill the restart loop without a GPU",
    )
    vram_source_file: str = Field(
        "/tmp/zimage-vram.json", description='The figures for vram_source=file: {"process_bytes": N}'
    )
    vram_scope: Literal["process", "device"] = Field(
        "process", description="Count this process's GPU memory, or all of it on the device"
    )
    vram_sample_period_s: float = Field(1.0, gt=0, le=60, description="Seconds between GPU memory samples")
    vram_consecutive: int = Field(
        3, ge=1, le=100, description="Samples in a row over (or back under) the limit"
    )
    vram_recover: bool = Field(
        True, description="Let liveness pass again once memory falls back under the limit"
    )
    vram_hysteresis: float = Field(0.05, ge=0, lt=1, description="Recovery needs memory this fraction under")
    termination_log_path: str = Field(
        "/dev/termination-log", description="Where the reason for a VRAM failure is written for the kubelet"
    )
    drain_timeout_s: float | None = Field(
        None, gt=0, description="Most seconds to finish accepted work after SIGTERM (default: timeout + 5)"
    )

    png_encoder: Literal["fast", "pillow"] = Field(
        "fast", description="fast: own multi-threaded PNG writer; pillow: Pillow at png_compress_level"
    )
    png_compress_level: int = Field(
        1, ge=0, le=9, description="zlib level for PNG with the pillow encoder (1 is fast, 9 is small)"
    )
    default_quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality when a request names none")
    encode_threads: int = Field(2, ge=1, le=64)

    @field_validator("warmup_sizes", "served_model_names", "compile_parts", "cuda_graph_parts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.health_port is not None and self.health_port == self.port:
            raise ValueError(f"health_port must differ from port ({self.port})")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        for name in ("min_size", "max_size"):
            if getattr(self, name) % SIZE_MULTIPLE:
                raise ValueError(f"{name} must be a multiple of {SIZE_MULTIPLE}")
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps must not exceed max_steps")
        if self.sequence_parallel > 1 and (self.workers or 1) > 1:
            raise ValueError(
                f"workers ({self.workers}) and sequence_parallel ({self.sequence_parallel}) cannot both be "
                "above 1: choose several workers (throughput) or one image across GPUs (latency)"
            )
        if (self.sequence_parallel > 1 or (self.workers or 1) > 1) and ":" in self.device:
            raise ValueError(
                f"device {self.device!r} names one GPU; several workers or sequence_parallel take the "
                "visible GPUs in order (set device auto, cuda or cpu)"
            )
        if (
            self.sequence_parallel > 1
            and self.cuda_graphs is not False
            and "transformer" in self.cuda_graph_parts
        ):
            raise ValueError(
                "sequence_parallel cannot replay the transformer as CUDA graphs: its steps exchange "
                "the sequence with the other ranks; drop transformer from cuda_graph_parts"
            )
        if self.sequence_parallel > 1 and self.serve_while_compiling:
            raise ValueError(
                "serve_while_compiling cannot be on with sequence_parallel: the ranks run every call in "
                "lockstep, so they warm up before they serve; leave it unset or false"
            )
        if not self.served_model_names:
            raise ValueError("served_model_names needs at least one name")
        check_adapter_list(self.loras)
        for adapter in self.loras:
            if adapter.name in self.served_model_names:
                raise ValueError(
                    f"loras: the name {adapter.name!r} is also a served model name; a request's model "
                    "names either one, so rename the adapter"
                )
        for size in [self.default_size, *self.warmup_sizes]:
            self.check_size(size)
        _check_parts("compile_parts", self.compile_parts, COMPILABLE)
        _check_parts("cuda_graph_parts", self.cuda_graph_parts, GRAPHABLE)
        check_attention_backend(self.attention_backend)
        if self.vram_limit is not None:
            VramLimit.parse(self.vram_limit)
        if self.api_keys_file is not None:
            read_key_file(self.api_keys_file)
        elif self.api_keys is not None and not parse_keys(self.api_keys.get_secret_value()):
            raise ValueError("api_keys is set but holds no key; unset it to turn authentication off")
        return self

    @property
    def authenticated(self) -> bool:
        return self.api_keys_file is not None or self.api_keys is not None

    @property
    def drain_seconds(self) -> float:
        return self.drain_timeout_s if self.drain_timeout_s is not None else self.request_timeout_s + 5

    def check_size(self, size: str) -> tuple[int, int]:
        """Return (width, height) or raise ``ValueError`` saying what is wrong with ``size``."""
        width, height = parse_size(size)
        if not all(self.min_size <= side <= self.max_size for side in (width, height)):
            raise ValueError(
                f"size {size!r}: width and height must be between {self.min_size} and {self.max_size}"
            )
        if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
            raise ValueError(
                f"size {size!r}: width and height must be multiples of {SIZE_MULTIPLE}; "
                f"try {self._round(width)}x{self._round(height)}"
            )
        return width, height

    def _round(self, side: int) -> int:
        """The nearest multiple of SIZE_MULTIPLE within the size range."""
        nearest = round(side / SIZE_MULTIPLE) * SIZE_MULTIPLE
        return max(self.min_size, min(self.max_size, nearest))


# ZIMAGE_ names that are not server settings but belong to the project's other programs.
OTHER_VARIABLES = frozenset({"ZIMAGE_CACHE_DIR", "ZIMAGE_CLUSTER_CACHE"})
OTHER_PREFIXES = ("ZIMAGE_OPERATOR_",)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``ZIMAGE_*`` names in ``environ`` that no setting reads: a typo must not pass silently."""
    known = {f"ZIMAGE_{name.upper()}" for name in Settings.model_fields}
    return sorted(
        name
        for name in environ
        if name.upper().startswith("ZIMAGE_")
        and name.upper() not in known | OTHER_VARIABLES
        and not name.upper().startswith(OTHER_PREFIXES)
    )


def load_settings(args: Sequence[str] = ()) -> Settings:
    """The settings from flags and the environment, checked as ``serve`` checks them before it
    starts. Raises ``ValueError`` (pydantic's ``ValidationError`` is one) or ``ModelSourceError``,
    each saying what to fix."""
    from pydantic_settings import CliApp

    unknown = unknown_variables(os.environ)
    if unknown:
        raise ValueError(
            f"unknown setting {', '.join(unknown)} in the environment; "
            "`zimage-server serve --help` lists the settings (each read as ZIMAGE_<NAME>)"
        )
    settings = CliApp.run(Settings, cli_args=list(args))
    ModelSource.parse(settings.model, settings.revision)
    return settings
