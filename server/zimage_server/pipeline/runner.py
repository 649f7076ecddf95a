"""Loads a ``ZImagePipeline`` and runs batches on it. Everything here runs on one worker thread."""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from zimage_server.core.adapters import Selection
from zimage_server.core.config import Settings
from zimage_server.core.processes import process_age
from zimage_server.core.sources import ModelSource
from zimage_server.pipeline import (
    acceleration,
    adapters,
    compile_artifacts,
    cuda_graphs,
    partials,
    weight_prefetch,
)
from zimage_server.pipeline.block_compile import CompileGate, OneAtATime
from zimage_server.pipeline.model_source import resolve

# This process's age once torch and the server's modules are imported (the interpreter's start
# included): the first part of the start-up's `imports` phase, diffusers' import in ``load``
# the rest.
_AGE_AT_IMPORT = process_age()

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Z-Image-Turbo is distilled to run without classifier-free guidance.
TURBO_GUIDANCE_SCALE = 0.0
# The pipeline's prompt window: longer prompts are truncated to it.
MAX_PROMPT_TOKENS = 512
# Prompts are encoded padded to a multiple of this (as the transformer pads its caption), not
# to the whole window: the text encoder's work follows the prompt's length.
PROMPT_PAD_MULTIPLE = 32
# Warm-up prompts of clearly different token lengths (the sequence is padded to 32 tokens).
WARMUP_PROMPTS = (
    "warm-up",
    "a longer warm-up prompt that pads to another sequence length " * 3,
    "a warm-up prompt of a third length, " * 2,
)


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} was asked for but CUDA is not available")
    return device


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[requested]


def worker_devices(settings: Settings) -> list[torch.device]:
    """The device of each pipeline worker: one per visible GPU unless ``workers`` says how many
    (the first ones, in order), or the one device asked for. With sequence parallel this
    process is rank 0 on the first GPU; the other ranks take the next ones."""
    base = pick_device(settings.device)
    if base.type != "cuda":
        return [base] * (settings.workers or 1)
    if base.index is not None:
        return [base]
    visible = torch.cuda.device_count()
    if settings.sequence_parallel > 1:
        if settings.sequence_parallel > visible:
            raise RuntimeError(
                f"sequence_parallel {settings.sequence_parallel} needs as many GPUs; {_visible(visible)}"
            )
        return [torch.device("cuda", 0)]
    wanted = settings.workers or visible
    if wanted > visible:
        raise RuntimeError(f"workers {wanted} needs {wanted} GPUs, one each; {_visible(visible)}")
    return [torch.device("cuda", index) for index in range(wanted)]


def _visible(count: int) -> str:
    return f"{count} {'is' if count == 1 else 'are'} visible"


EDIT_KINDS = ("img2img", "inpaint")


def denoising_steps(steps: int, strength: float) -> int:
    """The steps an edit at ``strength`` runs of ``steps``: the last ``strength`` of the
    schedule, as diffusers' image-to-image and inpainting pipelines cut it."""
    start = int(max(steps - min(steps * strength, steps), 0))
    return steps - start


@dataclass(frozen=True)
class EditBatch:
    """What an edit batch starts from: per item its image (at the batch's size) and, to
    inpaint, its mask (mode L, 255 where the image is repainted)."""

    kind: str  # one of EDIT_KINDS
    strength: float
    images: Sequence[Image.Image]
    masks: Sequence[Image.Image] = ()


@dataclass(frozen=True)
class BatchSpec:
    """One forward batch: images that share size and step count."""

    prompts: Sequence[str]
    seeds: Sequence[int]
    width: int
    height: int
    steps: int
    # Per item, how many partial images it wants (an empty sequence: none).
    partials: Sequence[int] = ()
    # The LoRA adapters of the whole batch, with their scales (none: the base model).
    adapters: Selection = ()
    # An edit batch's images (and masks); none: text to image.
    edit: EditBatch | None = None

    @property
    def denoising_steps(self) -> int:
        return self.steps if self.edit is None else denoising_steps(self.steps, self.edit.strength)


@dataclass(frozen=True)
class BatchResult:
    images: list[Image.Image]
    step_seconds: list[float]
    seconds: float


class PipelineRunner:
    def __init__(self, settings: Settings, device: torch.device | None = None) -> None:
        self.settings = settings
        self.source = ModelSource.parse(settings.model, settings.revision)
        self.device = device if device is not None else pick_device(settings.device)
        self.dtype = pick_dtype(settings.dtype, self.device)
        self.pipe: Any = None
        # Image-to-image and inpainting, built on the loaded pipeline's modules (no copy).
        self.edit_pipes: dict[str, Any] = {}
        self.admission_tokenizer: Any = None
        self.model_path: Path | None = None
        self.compile = settings.compile if settings.compile is not None else self.device.type == "cuda"
        # Serve uncompiled from the load on, and switch to the compiled parts once a warm-up
        # beside the serving has traced them (the gate opens); sequence-parallel ranks must run
        # each call in lockstep, so they warm up before they serve.
        self.serves_while_compiling = (
            self.compile
            and bool(settings.compile_parts)
            and settings.serve_while_compiling is not False
            and settings.sequence_parallel == 1
        )
        self.gate = CompileGate(opened=not self.serves_while_compiling)
        self._warmup_pipe: Any = None
        self._text_encoder_turns: OneAtATime | None = None
        self.warmup_prompts = WARMUP_PROMPTS
        self.tuning: acceleration.AccelerationReport | None = None
        self.startup_seconds: dict[str, float] = {}
        self.graphs: dict[str, cuda_graphs.ShapeGraphs] = {}
        self.artifacts = compile_artifacts.ArtifactState()
        self.adapters = adapters.AdapterBank(max_per_request=settings.lora_max_per_request)
        self.shares_artifacts = True  # loads (and saves) the shared compile artifacts
        self.workers = 1  # pipelines in this process: each compiles its own variants of the same code

    def bind_thread(self) -> None:
        """Make this runner's GPU the current one of the calling thread (its worker thread):
        streams, events and CUDA graphs follow the current device."""
        if self.device.type == "cuda":
            started = time.perf_counter()
            torch.cuda.set_device(self.device)
            # The context on the device is made on first use: make it here, as part of `start`.
            torch.empty(1, device=self.device)
            torch.cuda.synchronize(self.device)
            self.startup_seconds.setdefault("cuda_init", time.perf_counter() - started)

    def load(self) -> None:
        importing = time.perf_counter()
        from diffusers import ZImagePipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        imported = time.perf_counter() - importing
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()

        age = process_age()
        if age is not None and "start" not in self.startup_seconds:
            # Interpreter, imports (torch, diffusers, the server), the HTTP server starting and
            # CUDA's initialisation (this worker thread's first call, in `cuda_init`).
            self.startup_seconds["start"] = age
            if _AGE_AT_IMPORT is not None:
                self.startup_seconds["imports"] = _AGE_AT_IMPORT + imported
        self.model_path = self.resolve_model()
        self.before_load()
        started = time.perf_counter()
        pipe = ZImagePipeline.from_pretrained(str(self.model_path), dtype=self.dtype)
        prefetch = weight_prefetch.finish()  # the weights are read: its reading would only cost CPU now
        if prefetch is not None:
            self.startup_seconds["weights_prefetch"] = prefetch.seconds
        pipe.to(self.device)
        # Encoding a prompt is one pass: a key/value cache is never read, and filling one
        # per layer makes every compiled layer guard on its own cache slot (a recompile each).
        pipe.text_encoder.config.use_cache = False
        pipe.set_progress_bar_config(disable=True)
        if self.settings.loras:  # before fp8 and compile: the slots are part of what they make
            loading = time.perf_counter()
            token = self.settings.hf_token.get_secret_value() if self.settings.hf_token else None
            self.adapters = adapters.load_bank(
                pipe.transformer,
                self.settings.loras,
                max_per_request=self.settings.lora_max_per_request,
                max_rank=self.settings.lora_max_rank,
                cache_dir=self.settings.hf_cache_dir,
                token=token,
            )
            self.startup_seconds["adapters"] = time.perf_counter() - loading
        logger.info(
            "loaded %s from %s on %s as %s in %.1fs",
            self.source,
            self.model_path,
            self.device,
            str(self.dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )
        self.startup_seconds["load"] = time.perf_counter() - started
        started = time.perf_counter()
        width, height = self.settings.check_size(
            self.settings.warmup_sizes[0] if self.settings.warmup_sizes else self.settings.default_size
        )
        self.tuning = acceleration.apply(
            pipe,
            self.device,
            precision=self.settings.precision,
            attention_backend=self.settings.attention_backend,
            compile_parts=self.settings.compile_parts if self.compile else [],
            compile_cache_dir=self.settings.compile_cache_dir,
            compile_copies=self.workers,
            compile_batch_unbacked=self.settings.compile_batch_unbacked,
            before_compile=self.before_compile,
            gate=self.gate,
            # image tokens after the 2x2 patching of the 8x smaller latents, plus a prompt's
            attention_tokens=(width // 16) * (height // 16) + 64,
        )
        self.graphs = self._install_cuda_graphs(pipe)
        if not self.gate.opened:
            self._text_encoder_turns = OneAtATime(pipe.text_encoder.forward, self.gate)
            pipe.text_encoder.forward = self._text_encoder_turns
        self.tuning.cuda_graphs = sorted(self.graphs)
        if self.tuning.compiled and self.settings.compile_artifacts_dir and self.shares_artifacts:
            # Before the warm-up, whose calls do the compiling: loaded artifacts make them hits.
            loading = time.perf_counter()
            self.artifacts = compile_artifacts.load(self.artifact_path())
            self.startup_seconds["artifacts_load"] = time.perf_counter() - loading
        self.startup_seconds["tune"] = time.perf_counter() - started
        # A fast tokenizer is not safe to share between threads (a call that sets padding or
        # truncation while another encodes raises "Already borrowed"): admission checks on
        # the event loop get their own copy, the GPU worker keeps the pipeline's.
        self.admission_tokenizer = copy.deepcopy(pipe.tokenizer)
        # Worked out now, while nothing else uses the tokenizer (warm-up calls may run beside
        # requests).
        self.warmup_prompts = warmup_prompts(pipe.tokenizer)
        if self.serves_while_compiling:
            # The warm-up's own pipeline over the same modules, made here for the same reason.
            components = dict(pipe.components)
            components["scheduler"] = copy.deepcopy(pipe.scheduler)
            components["tokenizer"] = copy.deepcopy(pipe.tokenizer)
            self._warmup_pipe = type(pipe)(**components)
            self._warmup_pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.edit_pipes = edit_pipelines(pipe)

    def resolve_model(self) -> Path:
        """The model's local directory, downloading it first where the source is the Hub."""
        token = self.settings.hf_token.get_secret_value() if self.settings.hf_token else None
        return resolve(self.source, self.settings.hf_cache_dir, token)

    def before_load(self) -> None:
        """Called once the model is on local disk, before the pipeline is built."""

    def before_compile(self, pipe: Any) -> None:
        """Called on the tuned pipeline (attention processors final) before anything is compiled."""

    @property
    def alive(self) -> bool:
        """False once something this runner needs beyond its thread has died."""
        return True

    def follower_pids(self) -> list[int]:
        """Other processes that run this runner's work on their GPUs (their memory is its too)."""
        return []

    def stop(self) -> None:
        """Release what the runner started beyond its thread."""

    def artifact_path(self) -> Path:
        """The shared compile artifact for this device, these versions and these choices."""
        assert self.settings.compile_artifacts_dir, "compile_artifacts_dir is not set"
        assert self.tuning is not None, "the pipeline is not loaded"
        found = compile_artifacts.identity(
            self.device,
            model=str(self.source),
            dtype=str(self.dtype),
            precision=self.tuning.precision,
            attention=self.tuning.attention_backend,
            compiled=self.tuning.compiled,
            batch_unbacked=self.settings.compile_batch_unbacked,
            cuda_graphs=self.tuning.cuda_graphs,
            warmup=[[spec.width, spec.height, len(spec.prompts), spec.steps] for spec in self.warmup_specs()],
        )
        return compile_artifacts.artifact_path(self.settings.compile_artifacts_dir, found)

    def save_artifacts(self) -> None:
        """After the warm-up: save what it compiled, where no replica has yet."""
        if self.shares_artifacts and self.artifacts.state in ("absent", "ignored") and self.artifacts.path:
            saving = time.perf_counter()
            try:
                replace = self.artifacts.state == "ignored"
                self.artifacts = compile_artifacts.save(Path(self.artifacts.path), replace=replace)
                self.startup_seconds["artifacts_save"] = time.perf_counter() - saving
            except Exception as exc:  # a full or read-only volume costs the next replica time, not this one
                logger.warning("could not save compile artifacts: %s", exc)
                self.artifacts = compile_artifacts.ArtifactState("absent", self.artifacts.path, str(exc))

    def _install_cuda_graphs(self, pipe: Any) -> dict[str, cuda_graphs.ShapeGraphs]:
        wanted = self.settings.cuda_graphs
        if wanted and self.device.type != "cuda":
            raise acceleration.AccelerationError(
                f"cuda_graphs needs an NVIDIA GPU; the device is {self.device}"
            )
        if not (wanted if wanted is not None else self.device.type == "cuda"):
            return {}
        graphs = {}
        limit = self.settings.max_cuda_graphs
        for part in self.settings.cuda_graph_parts:
            if part == "transformer":
                graphs[part] = cuda_graphs.install(pipe.transformer, "transformer", limit, self.gate)
            else:
                graphed = cuda_graphs.install_text_encoder(pipe.text_encoder, limit, self.gate)
                if graphed is not None:
                    graphs[part] = graphed
        return graphs

    def warmup_specs(self) -> list[BatchSpec]:
        """What start-up generates before ready: each warm-up size once. With compile, the first
        size also runs the shapes requests bring later, so they are compiled now rather than on
        a client's time: another prompt length (the sequence becomes a dynamic dimension), full
        batches of one prompt (the batch dimension too), a full batch of prompts of different
        lengths (the padded, masked attention) and a smaller such batch. The first prompt's
        length is a multiple of 32 tokens and the second's is not: the transformer pads only
        the latter, and the two compile apart. Prompts longer than the 512-token window fill
        it without padding and still compile their own variant on first use."""
        steps = self.settings.warmup_steps
        prompts = self.warmup_prompts
        specs = []
        for index, size in enumerate(self.settings.warmup_sizes):
            width, height = self.settings.check_size(size)
            specs.append(BatchSpec([prompts[0]], [0], width, height, steps))
            if not self.compile or index > 0:
                continue
            specs.append(BatchSpec([prompts[1]], [0], width, height, steps))
            batch = self.settings.max_batch_size
            if batch > 1:
                specs.append(BatchSpec([prompts[0]] * batch, list(range(batch)), width, height, steps))
                specs.append(BatchSpec([prompts[1]] * batch, list(range(batch)), width, height, steps))
                mixed = [prompts[i % 2] for i in range(batch)]
                specs.append(BatchSpec(mixed, list(range(batch)), width, height, steps))
            if batch > 2:  # another batch size and padded length: both dimensions turn dynamic
                specs.append(BatchSpec([prompts[2], prompts[0]], [0, 1], width, height, steps))
        return specs

    def warm_up(self, spec: BatchSpec) -> BatchResult:
        """One warm-up call that builds the compiled path while requests are served beside it
        (on another thread, uncompiled): on a pipeline of its own over the same modules (its own
        scheduler and tokenizer, which keep per-call state), with the adapters left as the
        serving batch set them, its calls compiled whatever the gate says."""
        if self._warmup_pipe is None:
            raise RuntimeError("no warm-up beside the requests: serve_while_compiling is off or done")
        timer = _StepTimer(self.device)
        started = time.perf_counter()
        with self.gate.building():
            output = self._call_pipe(self._warmup_pipe, spec, timer, "pt")
        return BatchResult(partials.to_pil(output.images), timer.durations(), time.perf_counter() - started)

    def finish_warm_up(self) -> None:
        """The compiled path is built: every call runs it from now on."""
        self.gate.open()
        self._warmup_pipe = None

    def warm_up_failed(self) -> None:
        """The compiled path could not be built: calls go on uncompiled, the gate shut."""
        self._warmup_pipe = None

    @property
    def compiling(self) -> bool:
        """Whether a warm-up beside the requests is building the compiled path (from the load
        until it ends or fails)."""
        return self._warmup_pipe is not None

    def check_prompt(self, prompt: str) -> None:
        """Raise ``ValueError`` if the pipeline's tokenizer cannot encode ``prompt``: refused at
        admission, it can never fail the batch it would have joined."""
        if self.admission_tokenizer is None:
            return
        try:
            prompt_tokens(self.admission_tokenizer, [prompt])
        except Exception as exc:
            raise ValueError(
                f"the prompt cannot be tokenized ({type(exc).__name__}); send plain text"
            ) from exc

    def generate(self, spec: BatchSpec, observer: partials.StepObserver | None = None) -> BatchResult:
        """Run one batch; ``observer`` hears of each step and gets the partial images."""
        if self.pipe is None:
            raise RuntimeError("the pipeline is not loaded")
        timer = _StepTimer(self.device)
        pipe = self.pipe if spec.edit is None else self.edit_pipes[spec.edit.kind]
        if observer is not None:
            decoder = partials.PartialDecoder(pipe, spec.partials, spec.denoising_steps, observer)
            timer.observe(observer, decoder)
        uncompiled = self.compiling  # beside the warm-up that builds the compiled pipeline
        if uncompiled and self._text_encoder_turns is not None:
            self._text_encoder_turns.waited(reset=True)
        started = time.perf_counter()
        output = self.run_pipe(spec, timer, "pt")
        images = partials.to_pil(output.images)
        if spec.edit is not None and spec.edit.kind == "inpaint":
            # The unmasked pixels are the input's own: the VAE's round trip would blur them.
            images = [
                Image.composite(image, original.convert("RGB"), mask)
                for image, original, mask in zip(images, spec.edit.images, spec.edit.masks, strict=True)
            ]
        seconds = time.perf_counter() - started
        result = BatchResult(images=images, step_seconds=timer.durations(), seconds=seconds)
        if uncompiled:
            waited = self._text_encoder_turns.waited() if self._text_encoder_turns is not None else 0.0
            logger.info(
                "a batch of %d served uncompiled beside the compile in %.2fs: %.2fs of it waiting for the "
                "text encoder, steps %s s",
                len(spec.prompts),
                result.seconds,
                waited,
                ", ".join(f"{step:.3f}" for step in result.step_seconds),
            )
        return result

    def run_pipe(self, spec: BatchSpec, callback: Any, output_type: str) -> Any:
        """One pipeline call for ``spec``: the seeds' CPU generators (the same starting noise on
        any device and in any batch), the prompts' window, no guidance, the batch's adapters."""
        self.adapters.activate(spec.adapters)
        pipe = self.pipe if spec.edit is None else self.edit_pipes[spec.edit.kind]
        return self._call_pipe(pipe, spec, callback, output_type)

    def _call_pipe(self, pipe: Any, spec: BatchSpec, callback: Any, output_type: str) -> Any:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in spec.seeds]
        edit: dict[str, Any] = {}
        if spec.edit is not None:
            edit = {"image": list(spec.edit.images), "strength": spec.edit.strength}
            if spec.edit.kind == "inpaint":
                edit["mask_image"] = list(spec.edit.masks)
        return pipe(
            **edit,
            prompt=list(spec.prompts),
            height=spec.height,
            width=spec.width,
            num_inference_steps=spec.steps,
            guidance_scale=TURBO_GUIDANCE_SCALE,
            generator=generators,
            max_sequence_length=prompt_window(pipe.tokenizer, spec.prompts),
            callback_on_step_end=callback,
            output_type=output_type,
        )


def edit_pipelines(pipe: Any) -> dict[str, Any]:
    """Image-to-image and inpainting pipelines over ``pipe``'s own modules: the same weights,
    compiled blocks and CUDA graphs, nothing loaded twice."""
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

    pipes = {
        "img2img": ZImageImg2ImgPipeline(**pipe.components),
        "inpaint": ZImageInpaintPipeline(**pipe.components),
    }
    for edit in pipes.values():
        edit.set_progress_bar_config(disable=True)
    return pipes


def prompt_tokens(tokenizer: Any, prompts: Sequence[str]) -> list[int]:
    """Each prompt's length in tokens as the pipeline encodes it (inside its chat template)."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )
        for prompt in prompts
    ]
    return [len(ids) for ids in tokenizer(texts).input_ids]


def prompt_window(tokenizer: Any, prompts: Sequence[str]) -> int:
    """How many tokens the text encoder needs to see for ``prompts``: the longest one in the
    pipeline's chat template plus at least one padding token, rounded up to
    ``PROMPT_PAD_MULTIPLE``, at most the full window.

    The pipeline pads every prompt to the full 512-token window by default; the causal text
    encoder gives the real tokens the same hidden states whatever follows them, so padding on
    the right to the batch's longest prompt yields the same embeddings for a fraction of the
    work. The one padding token keeps the attention mask present in every call, so the
    compiled text encoder has one variant for it. With left padding the positions would move,
    so the full window is kept."""
    if getattr(tokenizer, "padding_side", "right") != "right":
        return MAX_PROMPT_TOKENS
    longest = max(prompt_tokens(tokenizer, prompts))
    padded = (longest // PROMPT_PAD_MULTIPLE + 1) * PROMPT_PAD_MULTIPLE
    return min(padded, MAX_PROMPT_TOKENS)


def warmup_prompts(tokenizer: Any) -> tuple[str, str, str]:
    """``WARMUP_PROMPTS`` with the first one lengthened to a multiple of 32 tokens (such a
    caption needs no padding in the transformer, a variant of its own for the compiler) and
    the second one not a multiple."""
    first, second = WARMUP_PROMPTS[0], WARMUP_PROMPTS[1]
    for extra in range(4 * PROMPT_PAD_MULTIPLE):
        candidate = first + " x" * extra
        if prompt_tokens(tokenizer, [candidate])[0] % PROMPT_PAD_MULTIPLE == 0:
            first = candidate
            break
    if prompt_tokens(tokenizer, [second])[0] % PROMPT_PAD_MULTIPLE == 0:
        second += " x"  # the second one must need padding
    return first, second, WARMUP_PROMPTS[2]


class _StepTimer:
    """Times denoising steps; on CUDA through events, so it never stalls the stream."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []
        self.observer: partials.StepObserver | None = None
        self.decoder: partials.PartialDecoder | None = None
        self.gaps: set[int] = set()  # intervals (between marks k and k + 1) spent decoding partials
        self._mark()

    def observe(self, observer: partials.StepObserver, decoder: partials.PartialDecoder) -> None:
        self.observer = observer
        self.decoder = decoder if decoder.wanted else None

    def _mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def __call__(
        self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        self._mark()
        if self.decoder is not None:
            decoded = self.decoder.decoded
            self.decoder.after_step(step, callback_kwargs["latents"])
            if self.decoder.decoded > decoded:  # decoding is not a step: its interval is left out
                self.gaps.add(len(self.marks) - 1)
                self._mark()
        if self.observer is not None:
            self.observer.step(step + 1, pipe.num_timesteps)
        return callback_kwargs

    def durations(self) -> list[float]:
        """Seconds per denoising step. The first interval also holds text encoding, so it is
        left out whenever a later step can speak for the step time."""
        pairs = [pair for k, pair in enumerate(itertools.pairwise(self.marks)) if k not in self.gaps]
        pairs = pairs[1:] if len(pairs) > 1 else pairs
        if self.cuda:
            torch.cuda.synchronize()
            return [start.elapsed_time(end) / 1000.0 for start, end in pairs]
        return [end - start for start, end in pairs]
