"""Z-Image-Turbo speed, side by side: plain diffusers against the server's bf16 and fp8 paths.

The model is built with the real architecture and random weights (no download): ``--scale
full`` is the real size (6B transformer, Qwen3-4B text encoder, Flux-type VAE), ``--scale
tiny`` the built-in tiny model (a quick check of this script on a CPU).

Stages (each appends to ``--results``; ``report`` renders them as docs/performance.md):

- ``pipeline``: one process, one card: per path and batch size the seconds per image end to
  end, the parts (text encoding, one transformer forward, VAE decode, image encoding), peak
  VRAM, and for fp8 the relative error of the transformer output against bf16;
- ``http``: the server on loopback with concurrent clients, against the same path's own
  throughput from the ``pipeline`` stage;
- ``coldstart``: process start to the first image served, to ready and to full speed, one
  process each: an empty compile cache (a new replica, which saves the shared compile
  artifacts), the same cache again (a container restart), and an empty cache with the
  artifacts (a new replica that loads them). A client sends its request again and again from
  the process's start until it is answered; full speed is when a request sent once ``/load``
  says the compiled pipeline serves was answered. Each run's log
  (``WORK/coldstart-PATH-RUN.log``) gives the warm-up calls' seconds and the recompiles;
- ``text``: text encoding alone, the baseline's way and the server's (the parts table uses it
  when present);
- ``imports``: what the server imports before it loads the model (the bulk of the start-up's
  ``start`` phase), in a fresh interpreter twice, with ``python -X importtime``: the time and
  where it goes, package by package.

    python bench/performance.py --scale full --stages pipeline --work /tmp/zimage-bench
    python bench/performance.py --scale full --stages http,coldstart --work /tmp/zimage-bench
    python bench/performance.py --stages report --doc docs/performance.md

This file measures; ``performance_report.py`` renders the results, ``performance_logs.py``
reads the server's metrics, log lines and ``-X importtime`` report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import http.client
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The sibling modules, whether this file runs as a script or is imported by its path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from performance_logs import import_profile, metric, metric_lines, startup_phases, warmup_breakdown
from performance_report import render
from zimage_server.core.processes import free_port, stop_process

PROMPT = (
    "a photo of a red fox in fresh snow at golden hour, detailed fur, soft rim light, shallow depth of field"
)
PATHS = ("diffusers", "server-bf16", "server-fp8")
NOTES_MARKER = "<!-- notes: kept when the tables above are written again -->"


# ---------------------------------------------------------------- model


def build_model(scale: str, directory: Path) -> Path:
    """Write a random-weight pipeline of the real architecture to ``directory`` (once)."""
    marker = directory / "bench_model.json"
    if marker.is_file() and json.loads(marker.read_text()).get("scale") == scale:
        return directory
    from zimage_server.pipeline.tiny_model import FULL, build_pipeline, build_tokenizer, make_tiny_model

    if scale == "tiny":
        make_tiny_model(directory)
        marker.write_text(json.dumps({"scale": scale}))
        return directory
    import torch

    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with tempfile.TemporaryDirectory() as scratch, torch.device("cuda"):
            # A byte-level tokenizer: the real Qwen vocabulary is not needed for timing.
            build_tokenizer(Path(scratch))
            pipe = build_pipeline(FULL, FULL.text_encoder["vocab_size"], Path(scratch))
    finally:
        torch.set_default_dtype(previous)
    built = time.perf_counter() - started
    pipe.save_pretrained(str(directory), safe_serialization=True)
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    marker.write_text(
        json.dumps({"scale": scale, "build_s": built, "save_s": time.perf_counter() - started - built})
    )
    return directory


# ---------------------------------------------------------------- timing


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> float:
    """Median seconds of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def graph_settings(parts: str) -> dict[str, Any]:
    """``--cuda-graphs`` as server settings: ``default`` (the server's), ``none`` or parts."""
    if parts == "default":
        return {}
    if parts == "none":
        return {"cuda_graphs": False}
    return {"cuda_graphs": True, "cuda_graph_parts": parts.split(",")}


def server_settings(
    model: Path,
    path: str,
    size: str,
    device: str,
    graphs: str = "default",
    server_args: str = "",
    **extra: Any,
) -> Any:
    """The settings of a path measured in this process; ``server_args`` (``--server-args``, the
    server's own flags) apply to the server paths, as they do to the servers the other stages
    start."""
    from pydantic_settings import CliSettingsSource

    from zimage_server.core.config import Settings

    tuned = path != "diffusers"
    if tuned and device == "cuda":
        extra = {**graph_settings(graphs), **extra}
    if tuned and server_args:
        extra = {**extra, **CliSettingsSource(Settings, cli_parse_args=shlex.split(server_args))()}
    return Settings(
        model=str(model),
        device=device,
        precision="fp8" if path == "server-fp8" else "bf16",
        compile=tuned and device == "cuda",
        attention_backend="auto" if tuned else "native",
        warmup_sizes=[size],
        max_batch_size=4,
        **extra,
    )


def text_window(path: str, tokenizer: Any) -> int:
    """The text encoder's token window: the pipeline's full one for the baseline, the one the
    server's runner picks for the prompt otherwise."""
    from zimage_server.pipeline.runner import MAX_PROMPT_TOKENS, prompt_window

    return MAX_PROMPT_TOKENS if path == "diffusers" else prompt_window(tokenizer, [PROMPT])


def encode_prompts(pipe: Any, batch: int, window: int) -> Any:
    """The pipeline's prompt encoding of ``batch`` copies of the prompt in a ``window`` of
    tokens. A new list each call: the pipeline writes its chat template into the list."""
    prompts = [PROMPT] * batch
    device = pipe._execution_device
    return pipe.encode_prompt(
        prompts, device=device, do_classifier_free_guidance=False, max_sequence_length=window
    )[0]


def stage_text(args: argparse.Namespace, model: Path, results: dict[str, Any]) -> None:
    """Text encoding alone, as the baseline runs it (512-token window, eager) and as the
    server does (the prompt's own window, the decoder layers compiled), and the server's way
    with the decoder layers not compiled (``server-bf16-uncompiled``: the CUDA graphs alone,
    where the server has them). Both server paths share it: fp8 covers the transformer only."""
    import torch

    rows: dict[str, Any] = results.setdefault("text", {})
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    for path in ("diffusers", "server-bf16", "server-bf16-uncompiled"):
        rows[path] = text_path(args, model, path, device)
        print(
            f"text {path}: window {rows[path]['window']}, {1000 * rows[path]['batch1_s']:.1f} ms", flush=True
        )
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def text_path(args: argparse.Namespace, model: Path, path: str, device: str) -> dict[str, Any]:
    import torch

    from zimage_server.pipeline.runner import PipelineRunner

    uncompiled = path.endswith("-uncompiled")
    path = path.removesuffix("-uncompiled")
    settings = server_settings(
        model, path, args.size, device, args.cuda_graphs, compile_parts=[] if uncompiled else ["text_encoder"]
    )
    runner = PipelineRunner(settings)
    if path == "diffusers":
        from diffusers import ZImagePipeline

        runner.pipe = ZImagePipeline.from_pretrained(str(model), dtype=runner.dtype).to(runner.device)
    else:
        runner.load()
    pipe = runner.pipe
    window = text_window(path, pipe.tokenizer)
    row: dict[str, Any] = {"window": window}
    with torch.no_grad():
        for batch in (1, 4):

            def encode(batch: int = batch) -> Any:
                return encode_prompts(pipe, batch, window)

            row[f"batch{batch}_s"] = timed(encode, args.repeat * 5, warmup=3) / batch
    return row


def part_timings(
    pipe: Any, batch: int, width: int, height: int, repeat: int, window: int
) -> dict[str, float]:
    """Seconds per image of the parts; ``window`` is the text encoder's token window (the
    pipeline's 512, or what the server's runner picks for the prompt)."""
    import torch

    device = pipe._execution_device

    def encode() -> Any:
        return encode_prompts(pipe, batch, window)

    with torch.no_grad():  # as in the pipeline's own call
        text = timed(encode, repeat)
        caps = encode()
        latents = torch.randn(
            batch, 16, 1, height // 8, width // 8, device=device, dtype=pipe.transformer.dtype
        )
        t = torch.full((batch,), 0.5, device=device, dtype=pipe.transformer.dtype)

        def forward() -> Any:
            return pipe.transformer(list(latents.unbind(0)), t, caps, return_dict=False)[0]

        step = timed(forward, repeat)
        decode_in = torch.randn(batch, 16, height // 8, width // 8, device=device, dtype=pipe.vae.dtype)
        vae = timed(lambda: pipe.vae.decode(decode_in, return_dict=False), repeat)
    return {"text_s": text / batch, "forward_s": step / batch, "vae_s": vae / batch}


def encode_timings(repeat: int) -> dict[str, float]:
    """Encoding a 1024x1024 image: Pillow's PNG (plain diffusers users save with it) against
    the server's PNG and JPEG."""
    import io

    import numpy as np
    from PIL import Image

    from zimage_server.core.encoding import encode_image

    rng = np.random.default_rng(0)
    axis = np.linspace(0, 255, 1024)
    smooth = np.stack(
        [np.add.outer(axis, axis) / 2, np.add.outer(axis, axis[::-1]) / 2, np.full((1024, 1024), 96.0)], -1
    )
    image = Image.fromarray((smooth + rng.normal(0, 3, smooth.shape)).clip(0, 255).astype(np.uint8))

    def pillow_png(level: int | None = None) -> None:
        image.save(io.BytesIO(), format="PNG", **({} if level is None else {"compress_level": level}))

    return {
        "pillow_png_default_s": timed(pillow_png, repeat),
        # The fair baseline: Pillow at the fastest level that still compresses.
        "pillow_png_level1_s": timed(lambda: pillow_png(1), repeat),
        "server_png_s": timed(lambda: encode_image(image, "png", 90, 1, "fast"), repeat),
        "server_jpeg_s": timed(lambda: encode_image(image, "jpeg", 90, 1, "fast"), repeat),
    }


def transformer_output(pipe: Any, width: int, height: int) -> Any:
    """The transformer's output on fixed inputs, for the fp8-against-bf16 error."""
    import torch

    device = pipe._execution_device
    generator = torch.Generator("cpu").manual_seed(7)
    with torch.no_grad():
        caps = pipe.encode_prompt([PROMPT], device=device, do_classifier_free_guidance=False)[0]
        latents = torch.randn(1, 16, 1, height // 8, width // 8, generator=generator).to(
            device, pipe.transformer.dtype
        )
        t = torch.full((1,), 0.5, device=device, dtype=pipe.transformer.dtype)
        out = pipe.transformer(list(latents.unbind(0)), t, caps, return_dict=False)[0]
    return torch.stack([o.float() for o in out]).cpu()


def stage_pipeline(args: argparse.Namespace, model: Path, results: dict[str, Any]) -> None:
    import torch

    width, height = (int(side) for side in args.size.split("x"))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = "cuda" if cuda else "cpu"
    rows: dict[str, Any] = results.setdefault("pipeline", {})
    reference: Any = None
    for path in args.paths.split(","):
        if path == "server-fp8" and not cuda:
            continue
        try:
            reference = measure_path(args, model, path, device, cuda, width, height, rows, reference)
        except Exception as exc:  # one path failing still leaves the others' figures
            import traceback

            traceback.print_exc()
            rows[path] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        gc.collect()
    results["encode"] = encode_timings(args.repeat * 3)


def measure_path(
    args: argparse.Namespace,
    model: Path,
    path: str,
    device: str,
    cuda: bool,
    width: int,
    height: int,
    rows: dict[str, Any],
    reference: Any,
) -> Any:
    import torch

    from zimage_server.pipeline.runner import TURBO_GUIDANCE_SCALE, BatchSpec, PipelineRunner

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    settings = server_settings(
        model,
        path,
        args.size,
        device,
        args.cuda_graphs,
        args.server_args,
        compile_cache_dir=str(args.work / "compile-cache"),
    )
    runner = PipelineRunner(settings)
    started = time.perf_counter()
    if path == "diffusers":  # plain: from_pretrained and .to(device), nothing else
        from diffusers import ZImagePipeline

        runner.pipe = ZImagePipeline.from_pretrained(str(model), dtype=runner.dtype).to(runner.device)
        runner.pipe.set_progress_bar_config(disable=True)
    else:
        runner.load()
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    if path != "diffusers":
        for spec in runner.warmup_specs():
            runner.generate(spec)
    warmup_s = time.perf_counter() - started
    row: dict[str, Any] = {"load_s": load_s, "warmup_s": warmup_s}
    if runner.tuning is not None:
        row["attention_backend"] = runner.tuning.attention_backend
        row["attention_ms"] = {k: v for k, v in runner.tuning.attention_ms.items() if v != float("inf")}
        row["fp8_linears"] = runner.tuning.fp8_linears
        row["cuda_graphs"] = runner.tuning.cuda_graphs
    window = text_window(path, runner.pipe.tokenizer)
    for batch in (1, 4):
        spec = BatchSpec([PROMPT] * batch, list(range(batch)), width, height, args.steps)
        if path == "diffusers":

            def run(spec: BatchSpec = spec) -> None:
                generators = [torch.Generator("cpu").manual_seed(seed) for seed in spec.seeds]
                runner.pipe(
                    prompt=list(spec.prompts),
                    height=height,
                    width=width,
                    num_inference_steps=args.steps,
                    guidance_scale=TURBO_GUIDANCE_SCALE,
                    generator=generators,
                )  # PIL images, as diffusers returns them by default

        else:

            def run(spec: BatchSpec = spec) -> None:
                runner.generate(spec)

        seconds = timed(run, args.repeat, warmup=1)
        row[f"batch{batch}"] = {
            "s_per_image": seconds / batch,
            "images_per_s": batch / seconds,
            **part_timings(runner.pipe, batch, width, height, args.repeat, window),
        }
        print(f"{path} batch {batch}: {seconds / batch:.3f} s per image", flush=True)
    if cuda:
        row["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30
    output = transformer_output(runner.pipe, width, height)
    if path == "server-bf16":
        reference = output
    if path == "server-fp8" and reference is not None:
        row["fp8_rel_error"] = float((output - reference).norm() / reference.norm())
    rows[path] = row
    return reference


# ---------------------------------------------------------------- server processes


def start_server(
    model: Path,
    path: str,
    args: argparse.Namespace,
    cache: Path,
    artifacts: Path | None = None,
    log: Path | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], int]:
    """``artifacts``: a compile artifacts directory; ``log``: the server's output at level info
    (with dynamo's recompile reasons), else warnings on this process's output; ``extra``: more
    flags."""
    port = free_port()
    command = [sys.executable, "-m", "zimage_server", "serve", "--port", str(port), "--model", str(model)]
    command += ["--warmup-sizes", args.size, "--max-batch-size", "4"]
    command += ["--log-level", "info" if log else "warning"]
    command += ["--compile-cache-dir", str(cache), "--device", args.device]
    command += ["--precision", "fp8" if path == "server-fp8" else "bf16"]
    if artifacts is not None:
        command += ["--compile-artifacts-dir", str(artifacts)]
    for name, value in graph_settings(args.cuda_graphs).items():
        flag = "--" + name.replace("_", "-")
        command += [flag, ",".join(value) if isinstance(value, list) else str(value).lower()]
    command += shlex.split(getattr(args, "server_args", "")) + list(extra)
    if log is None:
        return subprocess.Popen(command), port
    env = {**os.environ, "TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env), port


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if _ready_now(port):
                return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"not ready in {timeout}s")


def time_start(
    proc: subprocess.Popen[bytes], port: int, started: float, body: str, timeout: float
) -> dict[str, float]:
    """A server's start as its clients see it, in seconds from ``started`` (taken just before
    the process was started): ``ready_s`` when ``/healthz/ready`` first answered 200;
    ``first_image_s`` when the first request was answered 200, from a client that sends it
    again and again from the start (``first_request_s``: that answer's own time);
    ``compiled_s`` when ``/load`` first said the compiled pipeline serves (or that compile is
    off); ``full_speed_s`` when a request sent then was answered (``compiled_request_s``: its own
    time)."""
    found: dict[str, float] = {}
    deadline = started + timeout
    client = threading.Thread(target=_first_image, args=(port, body, started, deadline, found), daemon=True)
    client.start()
    while "compiled_s" not in found or client.is_alive():
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not serving compiled in {timeout}s: {found}")
        with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
            if "ready_s" not in found:
                if _ready_now(port):
                    found["ready_s"] = time.monotonic() - started
            elif "compiled_s" not in found:
                _, text = _get(port, "/load")
                if json.loads(text).get("compile", "off") != "compiling":
                    found["compiled_s"] = time.monotonic() - started
        time.sleep(0.1)
    if "first_image_s" not in found:
        raise RuntimeError(f"no image served in {timeout}s: {found}")
    sent = time.monotonic()
    errors: list[str] = []
    post_images(port, body, 1, errors)
    if errors:
        raise RuntimeError(f"the request at full speed failed: {errors[0]}")
    found["full_speed_s"] = time.monotonic() - started
    found["compiled_request_s"] = time.monotonic() - sent
    return found


def _ready_now(port: int) -> bool:
    """Whether ``/healthz/ready`` answers 200; raises when the server says its start failed."""
    status, text = _get(port, "/healthz/ready")
    if '"failed"' in text:
        raise RuntimeError(f"the server failed to start: {text}")
    return status == 200


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def _first_image(port: int, body: str, started: float, deadline: float, found: dict[str, float]) -> None:
    while time.monotonic() < deadline:
        sent = time.monotonic()
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            try:
                conn.request("POST", "/v1/images/generations", body, {"content-type": "application/json"})
                response = conn.getresponse()
                response.read()
            finally:
                conn.close()
            if response.status == 200:
                found["first_request_s"] = time.monotonic() - sent
                found["first_image_s"] = time.monotonic() - started
                return
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, grace=60)


def served_paths(args: argparse.Namespace) -> list[str]:
    """The server's own paths; fp8 only where there is a GPU."""
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    return [path for path in args.paths.split(",") if path != "diffusers" and (cuda or path != "server-fp8")]


def post_images(port: int, body: str, count: int, errors: list[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    for _ in range(count):
        conn.request("POST", "/v1/images/generations", body, {"content-type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            errors.append(f"{response.status}: {data[:200]!r}")
    conn.close()


def run_clients(port: int, body: str, clients: int, each: int, errors: list[str]) -> None:
    """``clients`` concurrent clients, each posting ``each`` requests one after another."""
    threads = [threading.Thread(target=post_images, args=(port, body, each, errors)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def stage_http(args: argparse.Namespace, model: Path, results: dict[str, Any]) -> None:
    rows = results.setdefault("http", {})
    for path in served_paths(args):
        cache = args.work / f"coldstart-{path}"  # the cold-start stage's, when it ran first
        proc, port = start_server(model, path, args, cache if cache.is_dir() else args.work / "compile-cache")
        try:
            ready_s = wait_ready(proc, port, 900)
            body = json.dumps({"prompt": PROMPT, "size": args.size, "num_inference_steps": args.steps})
            per_client = args.requests // args.clients
            errors: list[str] = []

            # The request path warm before the clock starts: full batches of this prompt have
            # run (and been captured as CUDA graphs), as on a server that has been serving.
            run_clients(port, body, args.clients, 2, errors)
            names = (
                "zimage_encode_duration_seconds_sum",
                "zimage_encode_duration_seconds_count",
                "zimage_batch_size_sum",
                "zimage_batch_size_count",
                "zimage_batch_duration_seconds_sum",
            )
            before = {name: metric(port, name) for name in names}
            started = time.perf_counter()
            run_clients(port, body, args.clients, per_client, errors)
            elapsed = time.perf_counter() - started
            if errors:
                raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
            delta = {name: metric(port, name) - before[name] for name in names}
            encode_sum = delta["zimage_encode_duration_seconds_sum"]
            encode_count = delta["zimage_encode_duration_seconds_count"]
            images = per_client * args.clients
            rows[path] = {
                "clients": args.clients,
                "images": images,
                "images_per_s": images / elapsed,
                "encode_ms_per_image": 1000 * encode_sum / max(encode_count, 1),
                "mean_batch": delta["zimage_batch_size_sum"] / max(delta["zimage_batch_size_count"], 1),
                # the share of the window the GPU worker spent in the pipeline
                "generating_share": delta["zimage_batch_duration_seconds_sum"] / elapsed,
                "output_format": "png",
                "start_to_ready_s": ready_s,
            }
            print(f"http {path}: {images / elapsed:.2f} images/s with {args.clients} clients", flush=True)
        finally:
            stop_server(proc)


# What the server imports before it loads the model: its app and HTTP server (torch, fastapi,
# uvicorn among them), then the pipeline's class in ``PipelineRunner.load``.
# The child prints its age once they are done (the interpreter's start included, its exit not).
SERVER_IMPORTS = (
    "import zimage_server.http.app, zimage_server.health.drain, zimage_server.http.http_server\n"
    "from diffusers import ZImagePipeline\n"
    "from zimage_server.core.processes import process_age\n"
    "print(process_age())"
)


def stage_imports(args: argparse.Namespace, model: Path, results: dict[str, Any]) -> None:
    """The server's imports alone, twice, each in a fresh interpreter (the second finds the
    files in the page cache and the bytecode written): the process's age once they are done
    (the server's ``imports`` phase, measured the same way), and the import work by package."""
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", SERVER_IMPORTS],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode:
            raise RuntimeError(f"the server's imports failed: {out.stderr[-2000:]}")
        wall = float(out.stdout.split()[-1])
        profile = import_profile(out.stderr)
        runs.append({"wall_s": wall, "import_s": sum(profile.values()), "by_package_s": profile})
        print(f"imports: {wall:.1f} s", flush=True)
    results["imports"] = {"runs": runs}


# The cold-start rows, run in this order: a new replica, a container restart, a new replica
# with the artifacts the first one wrote.
COLDSTART_RUNS = ("new", "restart", "artifacts")


def stage_coldstart(args: argparse.Namespace, model: Path, results: dict[str, Any]) -> None:
    """Per path, one process start each: an empty compile cache and no shared artifacts (a new
    replica today, which writes the artifacts), the same compile cache again (a container
    restart), then an empty compile cache with the artifacts (a new replica on another node)."""
    rows = results.setdefault("coldstart", {})
    for path in served_paths(args):
        cache = args.work / f"coldstart-{path}"
        artifacts = args.work / f"artifacts-{path}"
        for folder in (cache, artifacts, args.work / f"coldstart-{path}-new"):
            shutil.rmtree(folder, ignore_errors=True)
        row: dict[str, Any] = {}
        runs = {
            "new": ("empty_cache_s", cache),
            "restart": ("warm_cache_s", cache),
            "artifacts": ("artifacts_s", args.work / f"coldstart-{path}-new"),
        }
        for name, (label, compile_cache) in runs.items():
            if name not in args.coldstart_runs:
                continue
            log = args.work / f"coldstart-{path}-{label.removesuffix('_s')}.log"
            body = json.dumps({"prompt": PROMPT, "size": args.size, "num_inference_steps": args.steps})
            started = time.monotonic()
            proc, port = start_server(model, path, args, compile_cache, artifacts, log)
            try:
                seen = time_start(proc, port, started, body, 1500)
                row[label] = seen["ready_s"]
                row[label.replace("_s", "_seen")] = seen
                row[label.replace("_s", "_phases")] = startup_phases(port)
                row[label.replace("_s", "_artifacts")] = {
                    line.split('"')[1]: value
                    for line, value in metric_lines(port, "zimage_compile_artifacts")
                }
                row[label.replace("_s", "_fx_graphs")] = {
                    line.split('"')[1]: value
                    for line, value in metric_lines(port, "zimage_compile_fx_graphs")
                }
            finally:
                stop_server(proc)
                row[label.replace("_s", "_breakdown")] = warmup_breakdown(log)
                rows[path] = row
                args.save(results)
            seen = row[label.replace("_s", "_seen")]
            print(
                f"cold start {path} {label}: first image {seen['first_image_s']:.1f} s, ready "
                f"{row[label]:.1f} s, full speed {seen['full_speed_s']:.1f} s",
                flush=True,
            )
        rows[path] = row


# ---------------------------------------------------------------- report


def environment() -> dict[str, str]:
    import importlib.util

    import diffusers
    import torch
    import transformers

    env = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        # Whether the interpreters read torch's modules as bytecode (the server image's pip
        # install writes it) or compile them at every start: seconds of the imports.
        "torch_bytecode": str(Path(importlib.util.cache_from_source(torch.__file__)).is_file()).lower(),
    }
    with contextlib.suppress(ImportError):
        import torchao

        env["torchao"] = torchao.__version__
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name(0)
        with contextlib.suppress(Exception):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            )
            env["driver"] = out.stdout.strip()
    else:
        env["card"] = f"CPU ({os.cpu_count()} cores)"
    return env


STAGES: dict[str, Callable[[argparse.Namespace, Path, dict[str, Any]], None]] = {
    "pipeline": stage_pipeline,
    "http": stage_http,
    "coldstart": stage_coldstart,
    "text": stage_text,
    "imports": stage_imports,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--stages", default="pipeline,report")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument(
        "--cuda-graphs",
        default="default",
        help="CUDA graphs of the server paths: default (the server's), none, or parts "
        "(text_encoder,transformer)",
    )
    parser.add_argument(
        "--server-args",
        default="",
        help="more flags of the server, for the servers the http and coldstart stages start and "
        "the server paths the pipeline stage measures, e.g. '--compile-parts transformer,vae'",
    )
    parser.add_argument(
        "--coldstart-runs",
        default=",".join(COLDSTART_RUNS),
        help="which cold-start rows, in order: new, restart, artifacts (artifacts needs new first)",
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "zimage-bench")
    parser.add_argument(
        "--results", type=Path, default=None, help="JSON results (default: WORK/results.json)"
    )
    parser.add_argument("--doc", type=Path, default=None, help="where the report stage writes the Markdown")
    args = parser.parse_args()
    args.coldstart_runs = args.coldstart_runs.split(",")
    if unknown := set(args.coldstart_runs) - set(COLDSTART_RUNS):
        parser.error(
            f"--coldstart-runs: {', '.join(sorted(unknown))} is not one of {', '.join(COLDSTART_RUNS)}"
        )
    args.work.mkdir(parents=True, exist_ok=True)
    results_path = args.results or args.work / "results.json"
    args.save = lambda data: results_path.write_text(json.dumps(data, indent=2))
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    stages = args.stages.split(",")
    if unknown := set(stages) - {*STAGES, "report"}:
        parser.error(f"--stages: {', '.join(sorted(unknown))} is not one of {', '.join([*STAGES, 'report'])}")
    measuring = [stage for stage in stages if stage != "report"]
    if measuring:
        results["environment"] = environment()
        results.update(size=args.size, steps=args.steps, scale=args.scale)
        command = "python bench/performance.py " + " ".join(sys.argv[1:])
        for stage in measuring:
            results.setdefault("commands", {})[stage] = command
        model = build_model(args.scale, args.work / f"model-{args.scale}")
    for stage in measuring:
        STAGES[stage](args, model, results)
        results_path.write_text(json.dumps(results, indent=2))
    if "report" in stages:
        text = render(results, PATHS, PROMPT)
        print(text)
        if args.doc:
            # Hand-written notes below the marker survive a new run.
            notes = ""
            if args.doc.is_file() and NOTES_MARKER in args.doc.read_text():
                notes = args.doc.read_text().split(NOTES_MARKER, 1)[1]
            args.doc.write_text(text + "\n" + NOTES_MARKER + notes)


if __name__ == "__main__":
    main()
