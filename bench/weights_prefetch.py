"""A replica's start with its weights not in the page cache: read ahead from the process's start
(``prefetch_weights``) against read by the load alone, side by side.

Each run drops the model's files from the page cache first (``posix_fadvise(DONTNEED)``, which
needs no privileges), starts the server as its own process and takes start to Ready and the
server's own phases (``zimage_startup_seconds``). The runs alternate: prefetch on, off, and
off with the weights already cached (``warm``, the floor).

The model is the tiny pipeline with its text encoder's embedding table grown to ``--gib`` GiB
(rows no token reaches), saved in bf16, so that reading the weights takes as long as it does
for a real model on a slow volume, on a machine without a GPU (the CPU server loads them in
float32, reading every byte, as a GPU server does to copy them to the device). ``--model DIR``
takes a pipeline of your own (the real one on a GPU machine, for example, with ``--device
cuda``).

    python bench/weights_prefetch.py --gib 4 --runs 3 --work /tmp/zimage-prefetch
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from performance import environment, startup_phases, stop_server, wait_ready
from zimage_server.core.processes import free_port
from zimage_server.pipeline.weight_prefetch import WeightPrefetch, weight_files


def build_model(directory: Path, gib: float) -> Path:
    """The tiny pipeline, its text encoder's embedding table padded to about ``gib`` GiB."""
    marker = directory / "bench_prefetch.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"gib": gib, "dtype": "bfloat16"}:
        return directory
    import torch

    from zimage_server.pipeline.tiny_model import TINY, build_pipeline, build_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        vocab = build_tokenizer(Path(scratch))
        pipe = build_pipeline(TINY, vocab, Path(scratch))
    hidden = pipe.text_encoder.config.hidden_size
    rows = max(vocab, int(gib * 2**30 / (hidden * 2)))
    table = torch.nn.Embedding(rows, hidden)
    with torch.no_grad():
        table.weight[:vocab] = pipe.text_encoder.embed_tokens.weight
    pipe.text_encoder.embed_tokens = table
    pipe.text_encoder.config.vocab_size = rows
    # Saved in bf16 and loaded in float32 on a CPU: the load reads every byte, as a GPU's
    # does to copy them to the device (a CPU load of float32 weights would map them instead).
    pipe.to(torch.bfloat16).save_pretrained(str(directory), safe_serialization=True)
    marker.write_text(json.dumps({"gib": gib, "dtype": "bfloat16"}))
    return directory


def drop_from_page_cache(directory: Path) -> None:
    """Ask the kernel to drop the files' cached pages."""
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def read_through(directory: Path) -> None:
    """Read every weight file once (into the page cache), as the server's prefetch reads them."""
    WeightPrefetch(lambda: weight_files(directory)).start().finished.wait()


def cold_read_seconds(directory: Path) -> float:
    """How long reading the weights takes from storage, read whole, once (dropped again after)."""
    drop_from_page_cache(directory)
    started = time.perf_counter()
    read_through(directory)
    seconds = time.perf_counter() - started
    drop_from_page_cache(directory)
    return seconds


def one_start(model: Path, mode: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """``mode``: ``on`` (prefetch) or ``off`` with the weights dropped from the page cache, or
    ``warm``: off with them cached (read just before), the floor both are measured against."""
    import subprocess

    prefetch = mode == "on"
    drop_from_page_cache(model)
    if mode == "warm":
        read_through(model)
    port = free_port()
    command = [sys.executable, "-m", "zimage_server", "serve", "--port", str(port), "--model", str(model)]
    command += ["--device", args.device, "--warmup-sizes", args.size, "--log-level", "info"]
    command += ["--prefetch-weights" if prefetch else "--no-prefetch-weights"]
    command += shlex.split(args.server_args)
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        ready = wait_ready(proc, port, 900)
        phases = startup_phases(port)
    finally:
        stop_server(proc)
    row = {"mode": mode, "ready_s": ready, **{f"{name}_s": value for name, value in phases.items()}}
    print(
        json.dumps(
            {key: round(value, 2) if isinstance(value, float) else value for key, value in row.items()}
        )
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gib", type=float, default=4.0, help="size of the built model's weights")
    parser.add_argument("--model", type=Path, default=None, help="a pipeline directory instead")
    parser.add_argument("--runs", type=int, default=3, help="starts of each kind: on, off, warm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="256x256", help="the warm-up size")
    parser.add_argument(
        "--server-args", default="", help="more flags of the server, e.g. '--compile false' on a GPU"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "zimage-prefetch")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or build_model(args.work / "model", args.gib)
    weights = sum(path.stat().st_size for path in weight_files(model))
    results: dict[str, Any] = {
        "environment": environment(),
        "command": "python bench/weights_prefetch.py " + " ".join(sys.argv[1:]),
        "weights_gib": weights / 2**30,
        "cold_read_s": cold_read_seconds(model),
        "runs": [],
    }
    print(f"{weights / 2**30:.2f} GiB of weights, read cold in {results['cold_read_s']:.1f} s")
    for index in range(args.runs):
        for mode in ("on", "off", "warm") if index % 2 == 0 else ("warm", "off", "on"):
            log = args.work / f"start-{index}-{mode}.log"
            results["runs"].append(one_start(model, mode, args, log))
    summary = {}
    for mode in ("on", "off", "warm"):
        rows = [row for row in results["runs"] if row["mode"] == mode]
        summary[mode] = {
            key: statistics.median(row[key] for row in rows) for key in ("ready_s", "start_s", "load_s")
        }
    results["median"] = summary
    print(json.dumps(summary, indent=2))
    path = args.results or args.work / "results.json"
    path.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
