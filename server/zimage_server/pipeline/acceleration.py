"""The tuned pipeline path: attention backend, fp8 weights, regional compile, compile cache.

Each piece is a server setting; ``apply`` runs them in order after the weights are on the
device and before warm-up (which then triggers the compiles, so readiness includes them).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from zimage_server.core.choices import COMPILABLE
from zimage_server.pipeline.block_compile import (
    DECODER_LAYER,
    OPEN,
    TRANSFORMER_BLOCK,
    CompileGate,
    compile_blocks,
    compile_module,
)

logger = logging.getLogger(__name__)

# Candidates for attention_backend=auto: the ones PyTorch itself brings (no extra package),
# then those of optional packages when they are installed. Each must also take a padding
# mask (batches of prompts of different lengths) to qualify.
AUTO_ATTENTION_CANDIDATES = (
    "_native_cudnn",
    "_native_flash",
    "native",
    "_native_efficient",
    "flash",
    "_flash_3",
)
# fp8 needs float8 tensor cores: compute capability 8.9 (Ada) or 9.0 (Hopper) and newer.
FP8_MIN_CAPABILITY = (8, 9)


class AccelerationError(RuntimeError):
    """A setting that cannot work on this device or installation; the message says why."""


@dataclass
class AccelerationReport:
    attention_backend: str = "native"
    attention_ms: dict[str, float] = field(default_factory=dict)
    precision: str = "bf16"
    fp8_linears: int = 0
    compiled: list[str] = field(default_factory=list)
    compile_cache_dir: str | None = None
    cuda_graphs: list[str] = field(default_factory=list)  # the parts replayed as CUDA graphs


def use_compile_cache(directory: str) -> str:
    """Point Inductor's and Triton's on-disk caches at ``directory`` (a volume that outlives the
    container), so a restarted server loads compiled kernels instead of building them."""
    root = Path(directory)
    (root / "inductor").mkdir(parents=True, exist_ok=True)
    (root / "triton").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    return str(root)


def _time_cuda(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)) / repeat


def pick_attention_backend(
    heads: int, head_dim: int, tokens: int, dtype: torch.dtype, device: torch.device, repeat: int = 10
) -> tuple[str, dict[str, float]]:
    """Time each candidate on the transformer's own attention shape; return the fastest that
    also takes a padding mask, with every candidate's milliseconds (``inf`` where it failed)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (
        torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype, generator=generator)
        for _ in range(3)
    )
    mask = torch.ones(1, 1, 1, tokens, device=device, dtype=torch.bool)
    mask[..., tokens - 7 :] = False
    timings: dict[str, float] = {}
    for name in AUTO_ATTENTION_CANDIDATES:
        try:
            reference = dispatch_attention_fn(q, k, v, backend=name)
            masked = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=name)
            if not (torch.isfinite(reference).all() and torch.isfinite(masked).all()):
                raise RuntimeError("non-finite output")
            timings[name] = _time_cuda(_attention_call(dispatch_attention_fn, q, k, v, name), repeat)
        except Exception as exc:  # a backend this GPU or installation lacks
            logger.debug("attention backend %s unavailable: %s", name, exc)
            timings[name] = float("inf")
    usable = {name: ms for name, ms in timings.items() if ms != float("inf")}
    if not usable:
        return "native", timings
    return min(usable, key=usable.__getitem__), timings


def _attention_call(
    dispatch: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str
) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        return dispatch(q, k, v, backend=name)

    return call


def fp8_filter(module: torch.nn.Module, fqn: str) -> bool:
    """Which linears go to fp8: those of the main transformer blocks, except their adaLN
    modulation. Embedders, refiners and the final layer stay in bf16 (precision-sensitive), and
    so do LoRA adapters' slots (their linears are swapped into; the layer they wrap goes to fp8).
    Float8 matmuls need both sides a multiple of 16 (all of Z-Image-Turbo's are)."""
    return (
        isinstance(module, torch.nn.Linear)
        and fqn.startswith("layers.")
        and "adaLN_modulation" not in fqn
        and ".lora_" not in fqn
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def quantize_fp8(transformer: torch.nn.Module, device: torch.device) -> int:
    if device.type != "cuda":
        raise AccelerationError(f"precision fp8 needs an NVIDIA GPU; the device is {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise AccelerationError(
            f"precision fp8 needs compute capability 8.9 or newer (Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; use precision bf16"
        )
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        raise AccelerationError("precision fp8 needs the torchao package (pip install torchao)") from exc
    chosen = [name for name, module in transformer.named_modules() if fp8_filter(module, name)]
    # set_inductor_config=False: torchao's default turns on Inductor's coordinate-descent tuning
    # for the whole process, which compiles and times many variants of every Triton kernel (the
    # VAE's and the text encoder's too). On a fresh H200 that made the first warm-up call 549 s
    # instead of 56 s in bf16, with 3380 kernels in the Triton cache (docs/performance.md).
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    quantize_(transformer, config, filter_fn=fp8_filter)
    return len(chosen)


def compile_layers(model: torch.nn.Module, gate: CompileGate = OPEN) -> int:
    """Regional compile of a transformers model: each decoder layer (the classes the model
    names in ``_no_split_modules``) compiled once and reused by all the others, its prompt
    length and batch dynamic from the first call (block_compile.py). Tracing the whole 36-layer
    text encoder instead takes about five times longer, on every start, even with a warm
    compile cache (docs/performance.md). Returns how many layers; a model without such layers
    is compiled whole. ``gate``: when calls run the compiled code (block_compile.py)."""
    count = compile_blocks(model, getattr(model, "_no_split_modules", None) or [], DECODER_LAYER, gate)
    if not count:
        compile_module(model, gate)
    return count


def compile_pipeline(
    pipe: Any,
    parts: list[str],
    copies: int = 1,
    unbacked_batch: bool = False,
    gate: CompileGate = OPEN,
) -> list[str]:
    """Regional compile: the transformer's repeated block and the text encoder's decoder layer
    (their varying dimensions dynamic from the first call, see block_compile.py) are each
    compiled once and reused by all their instances; the VAE decoder is compiled whole.
    ``copies``: pipelines in this process on other GPUs, each with variants of its own.
    ``unbacked_batch``: the transformer's block traces one image and several alike.
    ``gate``: when calls run the compiled code rather than the parts' own."""
    import torch._dynamo.config as dynamo_config

    # Sizes, prompt lengths and batch sizes vary; after the first change a dimension is
    # compiled as dynamic, so the number of compiled variants stays small.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, 64 * copies)
    compiled = []
    for part in parts:
        if part == "transformer":
            blocks = getattr(pipe.transformer, "_repeated_blocks", None) or []
            marking = replace(TRANSFORMER_BLOCK, unbacked_batch=unbacked_batch)
            if not compile_blocks(pipe.transformer, blocks, marking, gate, fullgraph=True):
                raise AccelerationError(
                    f"{type(pipe.transformer).__name__} names no repeated blocks to compile"
                )
        elif part == "vae":
            compile_module(pipe.vae.decoder, gate)
        elif part == "text_encoder":
            compile_layers(pipe.text_encoder, gate)
        else:
            raise AccelerationError(f"compile part {part!r} is not one of {', '.join(COMPILABLE)}")
        compiled.append(part)
    return compiled


def apply(
    pipe: Any,
    device: torch.device,
    *,
    precision: str,
    attention_backend: str,
    compile_parts: list[str],
    compile_cache_dir: str | None,
    attention_tokens: int,
    compile_copies: int = 1,
    compile_batch_unbacked: bool = False,
    before_compile: Callable[[Any], None] | None = None,
    gate: CompileGate = OPEN,
) -> AccelerationReport:
    report = AccelerationReport(precision=precision)
    started = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if "transformer" in compile_parts:
        from zimage_server.pipeline.rotary import use_real_rotary

        # Same numbers, but no complex tensors inside the compiled blocks (see rotary.py).
        # Swapped before the attention backend is set, which configures the processors.
        use_real_rotary(pipe.transformer)
    backend = attention_backend
    if backend == "auto":
        if device.type == "cuda":
            config = pipe.transformer.config
            backend, report.attention_ms = pick_attention_backend(
                config.n_heads, config.dim // config.n_heads, attention_tokens, pipe.transformer.dtype, device
            )
        else:
            backend = "native"
    if backend != "native":  # native (SDPA) is what diffusers uses unless told otherwise
        pipe.transformer.set_attention_backend(backend)
    report.attention_backend = backend
    if precision == "fp8":
        report.fp8_linears = quantize_fp8(pipe.transformer, device)
    if before_compile is not None:
        before_compile(pipe)
    if compile_parts:
        if compile_cache_dir:
            report.compile_cache_dir = use_compile_cache(compile_cache_dir)
        report.compiled = compile_pipeline(pipe, compile_parts, compile_copies, compile_batch_unbacked, gate)
    logger.info(
        "pipeline tuned in %.1fs: attention %s%s, precision %s (%d fp8 linears), compiled %s, cache %s",
        time.perf_counter() - started,
        backend,
        f" (measured ms: {report.attention_ms})" if report.attention_ms else "",
        precision,
        report.fp8_linears,
        ", ".join(report.compiled) or "nothing",
        report.compile_cache_dir or "torch default",
    )
    return report
