"""Image edits' cost, side by side in one process per precision: seconds per edit at strength
0.5 and 1.0 (image to image) and an inpainting, against a generation of the same size and
steps on the same server path. An edit at strength s runs s of the steps, plus the VAE encode
of its image: the goal is at most s x a generation + 60 ms.

The model is the real architecture with random weights (``performance.build_model``).

    python bench/edits.py --scale full --precisions bf16,fp8 --work /tmp/zimage-bench \\
        --out /tmp/zimage-bench/edits.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from performance import PROMPT, build_model, environment, server_settings, sync, timed

CASES = (("img2img", 0.5), ("img2img", 1.0), ("inpaint", 1.0))


def measure(args: argparse.Namespace, model: Path, precision: str) -> dict[str, Any]:
    import torch

    from zimage_server.pipeline.runner import BatchSpec, EditBatch, PipelineRunner

    width, height = (int(side) for side in args.size.split("x"))
    settings = server_settings(
        model,
        f"server-{precision}",
        args.size,
        args.device,
        compile_cache_dir=str(args.work / "compile-cache"),
    )
    runner = PipelineRunner(settings)
    started = time.perf_counter()
    runner.load()
    for spec in runner.warmup_specs():
        runner.generate(spec)
    result: dict[str, Any] = {"load_and_warmup_s": time.perf_counter() - started}
    source = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB"
    )
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    generation = BatchSpec([PROMPT], [0], width, height, args.steps)
    result["generation_s"] = timed(lambda: runner.generate(generation), args.repeat, warmup=1)
    print(f"{precision} generation: {result['generation_s']:.4f} s", flush=True)
    for kind, strength in CASES:
        edit = EditBatch(kind, strength, [source], [mask] if kind == "inpaint" else [])
        spec = BatchSpec([PROMPT], [0], width, height, args.steps, edit=edit)
        seconds = timed(lambda spec=spec: runner.generate(spec), args.repeat, warmup=1)
        goal = strength * result["generation_s"] + 0.060
        result[f"{kind}-{strength}"] = {"s": seconds, "goal_s": goal, "steps": spec.denoising_steps}
        print(f"{precision} {kind} strength {strength}: {seconds:.4f} s (goal {goal:.4f} s)", flush=True)
    # The VAE encode alone, what an edit adds besides its steps.
    pipe = runner.edit_pipes["img2img"]
    pixels = pipe.image_processor.preprocess(source, height=height, width=width).to(
        runner.device, runner.dtype
    )

    def encode() -> None:
        with torch.no_grad():
            pipe.vae.encode(pixels)

    result["vae_encode_s"] = timed(encode, args.repeat, warmup=1)
    sync()
    return result  # the runner goes with this frame


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=["tiny", "full"], default="full")
    parser.add_argument("--precisions", default="bf16,fp8")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda; cpu checks this script on the tiny model")
    parser.add_argument("--work", type=Path, default=Path("/tmp/zimage-bench"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_model(args.scale, args.work / f"model-{args.scale}")
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["environment"] = environment()
    results["size"], results["steps"] = args.size, args.steps
    for precision in args.precisions.split(","):
        try:
            results[precision] = measure(args, model, precision)
        except Exception as exc:  # fp8 on a card without float8, say: what failed is a result too
            results[precision] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{precision} failed: {exc}", flush=True)
        args.out.write_text(json.dumps(results, indent=2))
        gc.collect()
        if args.device == "cuda":
            import torch

            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
