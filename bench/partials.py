"""What streamed partial images cost, side by side in one process: the same generation (batch 1,
the server's runner with its defaults on the device) with 0, 1 and 3 partial images.

Each figure is the median of ``--repeat`` runs after the warm-up; ``ms_per_partial`` is the
extra time per partial image against the run without any, and ``decode_ms`` the time the
runner measured around each partial's clean estimate and VAE decode (what
``zimage_partial_image_duration_seconds`` records). Encoding the partial image (PNG by default)
happens off the worker thread and is not in these figures.

    python bench/partials.py --scale full --size 1024x1024 --out /tmp/zb/partials.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from performance import PROMPT, build_model, environment, server_settings


class Observer:
    def __init__(self) -> None:
        self.decode_s: list[float] = []

    def step(self, done: int, steps: int) -> None:
        pass

    def partial(self, item: int, index: int, image: Any, seconds: float) -> None:
        self.decode_s.append(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=Path("/tmp/zimage-bench"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch

    from zimage_server.pipeline.runner import BatchSpec, PipelineRunner

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(args.scale, args.work / f"model-{args.scale}")
    runner = PipelineRunner(server_settings(model, "server-bf16", args.size, device))
    runner.load()
    for spec in runner.warmup_specs():
        runner.generate(spec)
    width, height = (int(side) for side in args.size.split("x"))
    counts = (0, 1, 3)
    seconds: dict[int, list[float]] = {count: [] for count in counts}
    decode: dict[int, list[float]] = {count: [] for count in counts}
    made: dict[int, int] = {}
    for run in range(args.repeat + 1):  # interleaved, so that drift touches every row alike
        for count in counts:
            observer = Observer()
            spec = BatchSpec([PROMPT], [run], width, height, args.steps, [count])
            started = time.perf_counter()
            runner.generate(spec, observer)
            made[count] = len(observer.decode_s)
            if run:  # the first round is a warm-up
                seconds[count].append(time.perf_counter() - started)
                decode[count].extend(observer.decode_s)
    rows: dict[str, Any] = {
        str(count): {
            "partials": made[count],
            "seconds": statistics.median(seconds[count]),
            "decode_ms": 1000 * statistics.median(decode[count]) if decode[count] else None,
        }
        for count in counts
    }
    for count in ("1", "3"):
        row = rows[count]
        row["ms_per_partial"] = 1000 * (row["seconds"] - rows["0"]["seconds"]) / max(1, row["partials"])
    result = {
        "environment": environment(),
        "size": args.size,
        "steps": args.steps,
        "scale": args.scale,
        "command": "python bench/partials.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for count, row in rows.items():
        extra = f", {row['ms_per_partial']:.1f} ms per partial" if "ms_per_partial" in row else ""
        decode = f", decode {row['decode_ms']:.1f} ms" if row["decode_ms"] else ""
        print(f"{count} partial images: {1000 * row['seconds']:.1f} ms{extra}{decode}")


if __name__ == "__main__":
    main()
