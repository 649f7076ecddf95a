"""Where a generation's GPU time goes: kernels by kind, and the gaps between them.

Loads the full-size random-weight model of ``bench/performance.py`` through the server's
runner (its tuned path: compile, attention backend, fp8 when asked), warms up at batch 1,
then profiles one generation and one transformer forward with ``torch.profiler``. Kernels are
grouped as matmul (bf16), fp8 matmul, attention, quantize (fp8 activations, fused or not),
fused (Inductor's other Triton kernels) and other; ``idle`` is the part of the wall time the
GPU ran no kernel at all.

    python bench/profile_step.py --work /tmp/zimage-bench --paths server-bf16,server-fp8 [--cuda-graphs none]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from performance import PROMPT, build_model, server_settings

KINDS = (
    ("fp8 matmul", ("_qqtst", "e4m3", "f8f8")),  # cuBLAS's float8 GEMMs (scaled_mm)
    ("attention", ("flash", "fmha", "attention", "cudnn_generated", "sdpa")),
    ("quantize", ("float8", "fp8", "quant", "amax")),  # activation quantization, fused or not
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "sm90_", "cublas")),
    ("fused", ("triton_",)),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def busy_union(intervals: list[tuple[float, float]]) -> float:
    """Microseconds during which at least one kernel ran."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def idle_gaps(kernels: list[Any], over_us: float = 100.0) -> list[tuple[float, str, str]]:
    """Stretches with no kernel running, longest first, with the kernels on either side."""
    ordered = sorted(kernels, key=lambda event: event.time_range.start)
    gaps, end, last = [], None, ""
    for event in ordered:
        if end is not None and event.time_range.start - end > over_us:
            gaps.append((event.time_range.start - end, last, event.name))
        if end is None or event.time_range.end > end:
            end, last = event.time_range.end, event.name
    return sorted(gaps, key=lambda gap: -gap[0])


def profile(fn: Any, top: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - started) * 1e6
    kernels = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for event in kernels:
        duration = event.time_range.end - event.time_range.start
        by_kind[kind_of(event.name)] += duration
        by_name[event.name][0] += duration
        by_name[event.name][1] += 1
        intervals.append((event.time_range.start, event.time_range.end))
    busy = busy_union(intervals)
    gaps = idle_gaps(kernels)
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {
        "wall_ms": wall_us / 1000,
        "busy_ms": busy / 1000,
        "idle_ms": (wall_us - busy) / 1000,
        "kernels": len(kernels),
        "gaps_over_0.1ms": {"count": len(gaps), "ms": sum(gap[0] for gap in gaps) / 1000},
        "largest_gaps": [
            {"ms": us / 1000, "after": before[:100], "before": after[:100]} for us, before, after in gaps[:8]
        ],
        "by_kind_ms": {kind: us / 1000 for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [
            {"name": name[:140], "ms": us / 1000, "calls": int(calls), "kind": kind_of(name)}
            for name, (us, calls) in ranked
        ],
    }


def run_path(args: argparse.Namespace, model: Path, path: str) -> dict[str, Any]:
    import torch

    from zimage_server.pipeline.runner import BatchSpec, PipelineRunner

    width, height = (int(side) for side in args.size.split("x"))
    settings = server_settings(
        model, path, args.size, "cuda", args.cuda_graphs, compile_cache_dir=str(args.work / "compile-cache")
    )
    runner = PipelineRunner(settings)
    runner.load()
    spec = BatchSpec([PROMPT] * args.batch, list(range(args.batch)), width, height, args.steps)
    started = time.perf_counter()
    runner.generate(spec)
    runner.generate(spec)
    warmup_s = time.perf_counter() - started
    pipe = runner.pipe
    with torch.no_grad():
        caps = pipe.encode_prompt([PROMPT] * args.batch, device="cuda", do_classifier_free_guidance=False)[0]
        latents = torch.randn(args.batch, 16, 1, height // 8, width // 8, device="cuda", dtype=torch.bfloat16)
        t = torch.full((args.batch,), 0.5, device="cuda", dtype=torch.bfloat16)

        def forward() -> Any:
            return pipe.transformer(list(latents.unbind(0)), t, caps, return_dict=False)[0]

        forward()
        forward()  # with CUDA graphs: the first call runs, the second captures, later ones replay
        result = {
            "warmup_s": warmup_s,
            "attention_backend": runner.tuning.attention_backend if runner.tuning else None,
            "cuda_graphs": sorted(runner.graphs),
            "generate": profile(lambda: runner.generate(spec), args.top),
            "forward": profile(forward, args.top),
        }
    return result


def show(path: str, result: dict[str, Any]) -> None:
    for part in ("generate", "forward"):
        data = result[part]
        kinds = ", ".join(f"{kind} {ms:.1f}" for kind, ms in data["by_kind_ms"].items())
        print(
            f"{path} {part}: wall {data['wall_ms']:.1f} ms, GPU busy {data['busy_ms']:.1f}, "
            f"idle {data['idle_ms']:.1f}, {data['kernels']} kernels; {kinds}"
        )
        gaps = data["gaps_over_0.1ms"]
        print(f"  idle stretches over 0.1 ms: {gaps['count']}, {gaps['ms']:.1f} ms in all; the longest:")
        for gap in data["largest_gaps"]:
            print(f"    {gap['ms']:8.2f} ms after {gap['after']} / before {gap['before']}")
        for row in data["top"]:
            print(f"    {row['ms']:8.2f} ms {row['calls']:5d}x {row['kind']:9s} {row['name']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/zimage-bench"))
    parser.add_argument("--paths", default="server-bf16")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--cuda-graphs",
        default="default",
        help="default (the server's), none, or parts (text_encoder,transformer)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    import torch

    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model("full", args.work / "model-full")
    results = {}
    for path in args.paths.split(","):
        results[path] = run_path(args, model, path)
        show(path, results[path])
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
