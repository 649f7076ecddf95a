"""The matmuls of one Z-Image transformer block, timed alone: what the card does per shape.

For each projection of a main block (dim 3840, feed-forward 10240) at the sequence length of a
1024x1024 image (4096 image tokens plus a caption), the time of cuBLAS's bf16 matmul and of a
row-wise scaled float8 matmul (what torchao's per-row fp8 runs), side by side with the same
projections fused into one matmul (q, k and v; the feed-forward's two input projections). It
also times the per-row float8 quantization of an activation, the pass each fp8 linear adds.

    python bench/gemm_shapes.py [--tokens 4224] [--batch 1] [--out gemm.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

DIM, HIDDEN = 3840, 10240
# (name, output features, input features, how many of them a block runs)
SHAPES = (
    ("q|k|v", DIM, DIM, 3),
    ("qkv fused", 3 * DIM, DIM, 1),
    ("out", DIM, DIM, 1),
    ("w1|w3", HIDDEN, DIM, 2),
    ("w13 fused", 2 * HIDDEN, DIM, 1),
    ("w2", DIM, HIDDEN, 1),
)


def time_ms(fn: Any, repeat: int = 50) -> float:
    """Median of ``repeat`` CUDA-event timings after a warm-up."""
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row float8 (e4m3) of ``x`` with its float32 scales, as torchao's dynamic per-row does."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096 + 128, help="sequence length of one image")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows_m = args.tokens * args.batch
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    quantize = torch.compile(quantize_rows)
    results: dict[str, Any] = {
        "tokens": args.tokens,
        "batch": args.batch,
        "card": torch.cuda.get_device_name(),
    }
    rows = []
    for name, out_features, in_features, count in SHAPES:
        x = torch.randn(rows_m, in_features, device=device, dtype=torch.bfloat16, generator=generator)
        w = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16, generator=generator)
        bf16 = time_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w))
        x8, x_scale = quantize(x)
        w8, w_scale = quantize_rows(w)
        w8_t, w_scale_t = w8.t(), w_scale.t()  # column-major, as _scaled_mm wants its second operand

        def fp8(x8: Any = x8, x_scale: Any = x_scale, w8_t: Any = w8_t, w_scale_t: Any = w_scale_t) -> Any:
            return torch._scaled_mm(
                x8, w8_t, scale_a=x_scale, scale_b=w_scale_t, out_dtype=torch.bfloat16, use_fast_accum=True
            )

        fp8_ms = time_ms(fp8)
        quant_ms = time_ms(lambda x=x: quantize(x))
        flop = 2 * rows_m * out_features * in_features
        row = {
            "name": name,
            "m": rows_m,
            "n": out_features,
            "k": in_features,
            "per_block": count,
            "bf16_ms": bf16,
            "bf16_tflops": flop / bf16 / 1e9,
            "fp8_ms": fp8_ms,
            "fp8_tflops": flop / fp8_ms / 1e9,
            "quantize_ms": quant_ms,
        }
        rows.append(row)
        print(
            f"{name:10s} {rows_m}x{out_features}x{in_features} x{count}: bf16 {bf16:.3f} ms "
            f"({row['bf16_tflops']:.0f} TFLOP/s), fp8 {fp8_ms:.3f} ms ({row['fp8_tflops']:.0f} TFLOP/s), "
            f"quantize input {quant_ms:.3f} ms",
            flush=True,
        )
        del x, w, x8, w8
    results["shapes"] = rows
    by_name = {row["name"]: row for row in rows}
    separate_names, fused_names = ("q|k|v", "out", "w1|w3", "w2"), ("qkv fused", "out", "w13 fused", "w2")
    for kind in ("bf16", "fp8"):

        def block(names: tuple[str, ...], per_block: bool, kind: str = kind) -> float:
            total = 0.0
            for name in names:
                row = by_name[name]
                ms = row[f"{kind}_ms"] + (row["quantize_ms"] if kind == "fp8" else 0.0)
                total += ms * (row["per_block"] if per_block else 1)
            return total

        separate, fused = block(separate_names, True), block(fused_names, False)
        results[f"block_{kind}_ms"] = {"separate": separate, "fused": fused}
        extra = " (each linear's input quantization included)" if kind == "fp8" else ""
        print(f"one block's matmuls in {kind}{extra}: separate {separate:.3f} ms, fused {fused:.3f} ms")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
