"""PNG encoding, side by side: the server's writer (png.py) against Pillow at its default level
and against Pillow at level 1, the fair baseline (the fastest level that still compresses, and
the server's own setting for its Pillow encoder). Same images, same process, one after another.

Two 1024x1024 RGB images: ``smooth`` (gradients with a little noise, like a photograph) and
``noise`` (uniform noise, like the random-weight model's output, the worst case for deflate).
Each figure is the median of ``--repeat`` runs after one warm-up run; sizes are in bytes.

    python bench/png_encode.py --repeat 20 --out .out/png.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from zimage_server.core.png import encode_png


def images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    axis = np.linspace(0, 255, 1024)
    smooth = np.stack(
        [np.add.outer(axis, axis) / 2, np.add.outer(axis, axis[::-1]) / 2, np.full((1024, 1024), 96.0)], -1
    )
    return {
        "smooth": Image.fromarray((smooth + rng.normal(0, 3, smooth.shape)).clip(0, 255).astype(np.uint8)),
        "noise": Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)),
    }


def pillow(level: int | None) -> Callable[[Image.Image], bytes]:
    def encode(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", **({} if level is None else {"compress_level": level}))
        return buffer.getvalue()

    return encode


def measure(encode: Callable[[Image.Image], bytes], image: Image.Image, repeat: int) -> dict[str, float]:
    data = encode(image)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        encode(image)
        times.append(time.perf_counter() - started)
    return {"ms": statistics.median(times) * 1000, "bytes": len(data)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    encoders = {"pillow-default": pillow(None), "pillow-level1": pillow(1), "server": encode_png}
    results = {
        name: {encoder: measure(fn, image, args.repeat) for encoder, fn in encoders.items()}
        for name, image in images().items()
    }
    import PIL

    report = {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "versions": {"pillow": PIL.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "results": results,
    }
    header = ["image", "Pillow default ms (bytes)", "Pillow level 1 ms (bytes)", "server ms (bytes)"]
    print("| " + " | ".join([*header, "level 1 / server"]) + " |")
    print("|---|---|---|---|---|")
    for name, row in results.items():
        cells = [f"{row[e]['ms']:.1f} ({row[e]['bytes']:,})" for e in encoders]
        print(f"| {name} | {' | '.join(cells)} | {row['pillow-level1']['ms'] / row['server']['ms']:.1f}x |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
