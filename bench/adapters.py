"""LoRA adapters' cost, side by side in one process: seconds per image with an adapter against
the same server path without any, per precision, batch size and rank ceiling, and the time to
swap adapters (and whether a swap compiles anything).

The model is the real architecture with random weights (``performance.build_model``); the
adapters are random too, of the real size: rank 16 and rank 64 on every attention projection
(to_q, to_k, to_v, to_out.0) and feed-forward linear (w1, w2, w3) of the transformer, written
in the diffusers LoRA format with its metadata, as a trained adapter is. Rows, each a server
path loaded and warmed up as the server does it:

- ``none``: no adapters configured (the baseline);
- ``r16``: the rank-16 adapter alone (its ceiling 16);
- ``r16+r64``: both, one per request (the ceiling 64, what every request then computes).

    python bench/adapters.py --scale full --precisions bf16,fp8 --work /tmp/zimage-bench \\
        --out /tmp/zimage-bench/adapters.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from performance import PROMPT, build_model, environment, server_settings, sync, timed

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
ROWS = {"none": (), "r16": ("r16",), "r16+r64": ("r16", "r64")}


def make_adapter(model: Path, out: Path, rank: int, seed: int) -> Path:
    """A random rank-``rank`` adapter for ``model``'s transformer, in the diffusers format."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = out / f"lora-r{rank}.safetensors"
    if path.is_file():
        return path
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for file in sorted((model / "transformer").glob("*.safetensors")):
        with safe_open(str(file), "pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                module = key.removesuffix(".weight")
                if not key.endswith(".weight") or not module.endswith(tuple(f".{name}" for name in TARGETS)):
                    continue
                out_features, in_features = weights.get_slice(key).get_shape()
                a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
                b = torch.randn(out_features, rank, generator=generator) * 0.01
                state[f"transformer.{module}.lora_A.weight"] = a.to(torch.bfloat16)
                state[f"transformer.{module}.lora_B.weight"] = b.to(torch.bfloat16)
    metadata = {
        "transformer.r": rank,
        "transformer.lora_alpha": rank,
        "transformer.target_modules": list(TARGETS),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata)})
    return path


def measure(
    args: argparse.Namespace, model: Path, precision: str, row: str, files: dict[str, Path]
) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    from zimage_server.pipeline.runner import BatchSpec, PipelineRunner

    width, height = (int(side) for side in args.size.split("x"))
    loras = [{"name": name, "source": str(files[name])} for name in ROWS[row]]
    settings = server_settings(
        model,
        f"server-{precision}",
        args.size,
        args.device,
        compile_cache_dir=str(args.work / "compile-cache"),
        loras=loras,
        lora_max_per_request=1,
    )
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    runner = PipelineRunner(settings)
    started = time.perf_counter()
    runner.load()
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    for spec in runner.warmup_specs():
        runner.generate(spec)
    result: dict[str, Any] = {
        "load_s": load_s,
        "adapters_load_s": runner.startup_seconds.get("adapters"),
        "warmup_s": time.perf_counter() - started,
        "rank_ceiling": runner.adapters.rank,
        "adapters": runner.adapters.report()["loaded"],
        "failed": runner.adapters.failed,
    }
    compiled = counters["frames"]["ok"]
    selections: list[tuple[str, tuple[tuple[str, float], ...]]] = [("base", ())]
    selections += [(name, ((name, 1.0),)) for name in ROWS[row]]
    for batch in (1, 4):
        for label, selection in selections:
            spec = BatchSpec(
                [PROMPT] * batch, list(range(batch)), width, height, args.steps, adapters=selection
            )
            seconds = timed(lambda spec=spec, run=runner.generate: run(spec), args.repeat, warmup=1)
            result[f"batch{batch}-{label}"] = seconds / batch
            print(f"{precision} {row} batch {batch} {label}: {seconds / batch:.4f} s per image", flush=True)
    if len(ROWS[row]) > 1:  # swaps between the two adapters, each a copy on the device
        swaps = []
        for index in range(args.swaps):
            name = ROWS[row][index % 2]
            sync()
            started = time.perf_counter()
            runner.adapters.activate(((name, 0.8),))
            sync()
            swaps.append(time.perf_counter() - started)
        result["swap_ms_median"] = statistics.median(swaps) * 1000
        result["swap_ms_max"] = max(swaps) * 1000
    result["compiled_after_warmup"] = counters["frames"]["ok"] - compiled
    del runner
    gc.collect()
    if cuda:
        result["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=["tiny", "full"], default="full")
    parser.add_argument("--precisions", default="bf16,fp8")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cuda; cpu checks this script on the tiny model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/zimage-bench"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.scale, args.work / f"model-{args.scale}")
    files = {
        "r16": make_adapter(model, args.work / f"adapters-{args.scale}", 16, seed=16),
        "r64": make_adapter(model, args.work / f"adapters-{args.scale}", 64, seed=64),
    }
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["environment"] = environment()
    for precision in args.precisions.split(","):
        for row in args.rows.split(","):
            try:
                results.setdefault(precision, {})[row] = measure(args, model, precision, row, files)
            except Exception as exc:  # fp8 with adapters, say: what failed is a result too
                results.setdefault(precision, {})[row] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{precision} {row} failed: {exc}", flush=True)
            args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
