"""Several GPUs per replica, each case beside the one-GPU server in the same run.

- ``data``: images per second with N workers (``--workers N``) against N times one worker's,
  with 4 clients per worker each sending its next request when its image comes back;
- ``sequence``: seconds per image with N GPUs on each image (``--sequence-parallel N``),
  one client, batch 1, against one GPU; the mean denoising step against one GPU's over N
  (what is left is mostly the all-to-all communication); and the largest pixel difference
  of fixed-seed images against the one-GPU server's;
- ``liveness``: a server on N GPUs with a VRAM limit of ``device`` scope; another process
  fills GPU N-1 past it; the probe must answer 503 naming that GPU.

The model is the real architecture with random weights (``--scale full``, as in
bench/performance.py) or the tiny one (``--scale tiny``: a check of this script, also on the
CPU, where the "GPUs" are CPU workers and gloo).

    python bench/multigpu.py --scale full --gpus 2,4 --work /tmp/zb
    python bench/multigpu.py --scale tiny --device cpu --gpus 2 --modes data,sequence
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from performance import (
    PROMPT,
    build_model,
    environment,
    metric,
    run_clients,
    start_server,
    stop_server,
    wait_ready,
)
from zimage_server.core.processes import free_port

SEEDS = (1, 2, 3)


def start(model: Path, args: argparse.Namespace, *flags: str) -> tuple[subprocess.Popen[bytes], int]:
    """The server as bench/performance.py starts it (the server's own defaults: compile and CUDA
    graphs on a GPU, neither on the CPU), with ``flags`` added."""
    path = f"server-{args.precision}"
    return start_server(model, path, args, args.work / "compile-cache", extra=flags)


def request(port: int, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", "/v1/images/generations", json.dumps(body), {"content-type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {data[:300]!r}")
    result: dict[str, Any] = json.loads(data)
    return result


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    return response.status, data


def pixels(result: dict[str, Any]) -> Any:
    import numpy as np
    from PIL import Image

    data = base64.b64decode(result["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def throughput(port: int, args: argparse.Namespace, clients: int) -> float:
    body = json.dumps({"prompt": PROMPT, "size": args.size, "num_inference_steps": args.steps})
    errors: list[str] = []
    run_clients(port, body, clients, 2, errors)  # every worker warm at full batches first
    each = max(2, args.requests // clients)
    started = time.perf_counter()
    run_clients(port, body, clients, each, errors)
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return clients * each / elapsed


def latency(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per image for one client at batch 1, the mean step, and the fixed-seed images."""
    body = {"prompt": PROMPT, "size": args.size, "num_inference_steps": args.steps}
    images = [pixels(request(port, {**body, "seed": seed})) for seed in SEEDS]  # also the warm-up
    steps_before = (
        metric(port, "zimage_step_duration_seconds_sum"),
        metric(port, "zimage_step_duration_seconds_count"),
    )
    times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        request(port, body)
        times.append(time.perf_counter() - started)
    step_sum = metric(port, "zimage_step_duration_seconds_sum") - steps_before[0]
    step_count = metric(port, "zimage_step_duration_seconds_count") - steps_before[1]
    return {
        "s_per_image": statistics.median(times),
        "step_ms": 1000 * step_sum / max(step_count, 1),
        "images": images,
    }


def serve_and(model: Path, args: argparse.Namespace, flags: list[str], measure: Any) -> Any:
    proc, port = start(model, args, *flags)
    try:
        ready_s = wait_ready(proc, port, args.ready_timeout)
        print(f"  ready in {ready_s:.1f} s ({' '.join(flags) or 'one GPU'})", flush=True)
        return measure(port)
    finally:
        stop_server(proc)


def stage_data(model: Path, args: argparse.Namespace, counts: list[int], results: dict[str, Any]) -> None:
    one = serve_and(model, args, ["--workers", "1"], lambda port: throughput(port, args, 4))
    rows = results.setdefault("data", {"1": {"images_per_s": one}})
    print(f"data 1 worker: {one:.3f} images/s", flush=True)
    for n in counts:
        ips = serve_and(model, args, ["--workers", str(n)], lambda port, n=n: throughput(port, args, 4 * n))
        rows[str(n)] = {"images_per_s": ips, "scaling": ips / (n * one)}
        print(f"data {n} workers: {ips:.3f} images/s, {ips / (n * one):.3f} of {n} x one", flush=True)


def stage_sequence(model: Path, args: argparse.Namespace, counts: list[int], results: dict[str, Any]) -> None:
    one = serve_and(model, args, ["--workers", "1"], lambda port: latency(port, args))
    rows = results.setdefault(
        "sequence", {"1": {"s_per_image": one["s_per_image"], "step_ms": one["step_ms"]}}
    )
    print(f"sequence 1 GPU: {one['s_per_image']:.3f} s/image, step {one['step_ms']:.1f} ms", flush=True)
    for n in counts:
        flags = ["--sequence-parallel", str(n), "--parallel-port", str(free_port())]
        got = serve_and(model, args, flags, lambda port: latency(port, args))
        diff = max(int(abs(a - b).max()) for a, b in zip(one["images"], got["images"], strict=True))
        rows[str(n)] = {
            "s_per_image": got["s_per_image"],
            "step_ms": got["step_ms"],
            # over one GPU's step split N ways: mostly the all-to-all exchanges
            "step_overhead_ms": got["step_ms"] - one["step_ms"] / n,
            "max_pixel_diff": diff,
        }
        print(
            f"sequence {n} GPUs: {got['s_per_image']:.3f} s/image, step {got['step_ms']:.1f} ms, "
            f"max pixel difference {diff}",
            flush=True,
        )


def stage_liveness(model: Path, args: argparse.Namespace, counts: list[int], results: dict[str, Any]) -> None:
    n = max(counts)
    proc, port = start(
        model, args,
        "--workers", str(n), "--vram-limit", "50%", "--vram-scope", "device",
        "--vram-sample-period-s", "0.5", "--vram-consecutive", "2",
    )  # fmt: skip
    hog = None
    try:
        wait_ready(proc, port, args.ready_timeout)
        status, before = get(port, "/healthz/live")
        target = n - 1
        # Another process fills 60% of the last GPU; the server's own use stays below half.
        hog = subprocess.Popen(
            [
                sys.executable, "-c",
                "import sys, time, torch; d = torch.device('cuda', int(sys.argv[1]));"
                " free, total = torch.cuda.mem_get_info(d);"
                " x = torch.empty(int(total * 0.6), dtype=torch.uint8, device=d); print('held', flush=True);"
                " time.sleep(600)",
                str(target),
            ],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert hog.stdout is not None
        hog.stdout.readline()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, report = get(port, "/healthz/live")
            if status == 503:
                break
            time.sleep(0.25)
        vram = report.get("vram", {})
        results["liveness"] = {
            "gpus": n,
            "before": before.get("vram"),
            "status": status,
            "gpu_named": vram.get("gpu"),
            "expected_gpu": str(target),
            "report": vram,
        }
        print(f"liveness with {n} GPUs: {status}, names GPU {vram.get('gpu')} (filled {target})", flush=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        stop_server(proc)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--gpus", default="2", help="GPU counts to compare with one, comma-separated")
    parser.add_argument("--modes", default="data,sequence,liveness")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--requests", type=int, default=32, help="timed requests per data-parallel case")
    parser.add_argument("--ready-timeout", type=float, default=1800)
    parser.add_argument("--work", type=Path, default=Path("/tmp/zimage-bench"))
    parser.add_argument(
        "--results", type=Path, default=None, help="JSON to write (default WORK/multigpu.json)"
    )
    args = parser.parse_args()
    args.cuda_graphs = "default"  # the server's own choice, as start_server reads it
    args.work.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in args.gpus.split(",") if int(n) > 1]
    if args.device != "cpu":
        import torch

        visible = torch.cuda.device_count()
        if counts and max(counts) > visible:
            parser.error(f"--gpus {args.gpus} needs {max(counts)} GPUs; {visible} are visible")
    model = build_model(args.scale, args.work / f"model-{args.scale}")
    results: dict[str, Any] = {
        "environment": environment(),
        "scale": args.scale,
        "size": args.size,
        "steps": args.steps,
        "precision": args.precision,
    }
    stages = {"data": stage_data, "sequence": stage_sequence, "liveness": stage_liveness}
    for mode in args.modes.split(","):
        if mode == "liveness" and (args.device == "cpu" or not counts):
            print("liveness: needs GPUs (two or more)", flush=True)
            continue
        stages[mode](model, args, counts, results)
    out = args.results or args.work / "multigpu.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
