"""VRAM liveness with real NVML on a real GPU (marker gpu; run with `make test-gpu`)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from zimage_server.core.processes import free_ports, stop_processes

from .conftest import RunningServer, ServerFactory

pytestmark = pytest.mark.gpu
MIB = 2**20
# Another process on the same GPU that takes 8 GiB and holds it.
HOG = (
    "import torch, time\n"
    "x = torch.empty(8 * 2**30, dtype=torch.uint8, device='cuda')\n"
    "x.fill_(1)\n"
    "torch.cuda.synchronize()\n"
    "print('allocated', flush=True)\n"
    "time.sleep(600)\n"
)


def _smi(query: str, kind: str = "gpu") -> list[list[str]]:
    flag = "--query-gpu" if kind == "gpu" else "--query-compute-apps"
    out = subprocess.run(
        ["nvidia-smi", f"{flag}={query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [[field.strip() for field in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def _live(server: RunningServer) -> httpx.Response:
    return httpx.get(f"{server.url}/healthz/live", timeout=5)


def _wait_live(server: RunningServer, status: int, timeout: float) -> float:
    started = time.monotonic()
    while _live(server).status_code != status:
        assert time.monotonic() - started < timeout, f"/healthz/live never answered {status}"
        time.sleep(0.02)
    return time.monotonic() - started


def test_the_sampler_agrees_with_nvidia_smi(serve: ServerFactory) -> None:
    server = serve(device="cuda", vram_limit="95%", vram_sample_period_s=0.2)
    time.sleep(0.5)
    vram = _live(server).json()["vram"]
    device_smi = int(_smi("memory.used")[0][0]) * MIB
    apps = {int(pid): int(used) * MIB for pid, used in _smi("pid,used_memory", kind="apps")}
    print(
        f"sampler: process {vram['process_bytes'] / MIB:.0f} MiB, device {vram['device_bytes'] / MIB:.0f} MiB"
    )
    print(f"nvidia-smi: process {apps.get(os.getpid(), 0) / MIB:.0f} MiB, device {device_smi / MIB:.0f} MiB")
    assert abs(vram["device_bytes"] - device_smi) <= 64 * MIB
    if os.getpid() in apps:  # NVML sees this process (no PID namespace in the way)
        assert abs(vram["process_bytes"] - apps[os.getpid()]) <= 64 * MIB
    else:
        assert vram["process_bytes"] > 0


def test_another_process_over_a_device_limit_fails_liveness_and_recovery_follows(
    serve: ServerFactory,
) -> None:
    base = int(_smi("memory.used")[0][0]) * MIB
    period, consecutive = 0.2, 3
    server = serve(
        device="cuda",
        vram_scope="device",
        vram_limit=str(base + 4 * 1024 * MIB),
        vram_sample_period_s=period,
        vram_consecutive=consecutive,
    )
    assert _live(server).status_code == 200
    hog = subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None
        assert hog.stdout.readline().strip() == "allocated"
        allocated = time.monotonic()
        _wait_live(server, 503, 30)
        failed_after = time.monotonic() - allocated
        body = _live(server).json()["vram"]
        print(
            f"device limit: 503 {failed_after:.2f}s after the allocation (K={consecutive}, period={period}s)"
        )
        assert body["scope"] == "device"
        assert body["used_bytes"] > body["limit_bytes"]
        assert failed_after <= (consecutive + 2) * period + 1.0
    finally:
        hog.kill()
        hog.wait()
    recovered = _wait_live(server, 200, 30)
    print(f"device limit: 200 again {recovered:.2f}s after the other process exited")


def test_a_process_limit_below_the_model_fails_liveness_after_start_up(
    serve: ServerFactory, tmp_path: Path
) -> None:
    server = serve(
        device="cuda",
        vram_scope="process",
        vram_limit="1Mi",
        vram_sample_period_s=0.2,
        vram_recover=False,
        termination_log_path=str(tmp_path / "termination-log"),
    )
    _wait_live(server, 503, 10)
    body = _live(server).json()["vram"]
    assert body["over_limit"] is True
    assert body["limit_bytes"] == MIB
    assert "VRAM limit exceeded (process)" in (tmp_path / "termination-log").read_text()
    print(f"process limit: {body['used_bytes'] / MIB:.0f} MiB used against 1 MiB; liveness 503")


def test_probe_latency_stays_low_while_the_gpu_generates(tiny_model_dir: Path) -> None:
    """Server, load and prober each in their own process, as in a cluster where the kubelet
    probes from outside: the latency measured is the server's, not a client's GIL."""
    port, health_port = free_ports(2)
    args = ["--port", str(port), "--model", str(tiny_model_dir), "--device", "cuda", "--max-size", "2048"]
    args += ["--warmup-sizes", "1024x1024", "--vram-limit", "95%", "--health-port", str(health_port)]
    # Eager: the tiny model's compile would only lengthen start-up; the GPU work is the same kind.
    env = {**os.environ, "ZIMAGE_COMPILE": "false"}
    server = subprocess.Popen([sys.executable, "-m", "zimage_server", "serve", *args], env=env)
    url = f"http://127.0.0.1:{port}"
    load: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz/ready").status_code == 200:
                    break
            assert server.poll() is None, "the server exited"
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        body = json.dumps(GPU_BOUND)
        load = [subprocess.Popen([sys.executable, "-c", LOAD, url, body]) for _ in range(3)]
        while "zimage_in_flight_requests 0.0" in httpx.get(f"{url}/metrics").text:
            time.sleep(0.05)
        images_before = _images(url)
        latencies = []
        with httpx.Client(timeout=5) as http:
            for _ in range(300):
                started = time.perf_counter()
                assert http.get(f"http://127.0.0.1:{health_port}/healthz/live").status_code == 200
                latencies.append((time.perf_counter() - started) * 1000)
                time.sleep(0.01)
        generated = _images(url) - images_before
    finally:
        stop_processes([*load, server], grace=60)
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]
    print(
        f"liveness latency while generating: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {latencies[-1]:.2f} ms"
    )
    print(f"{generated:.0f} images generated while probing")
    assert generated >= 2, "the GPU was generating while the probes ran"
    # The probes go to the health port, as the operator's do (docs/gpu-validation.md).
    assert p99 < 5.0


# A client in its own process that keeps the GPU generating until stopped: many denoising
# steps per image, as with the real model the GPU's work dominates; sys.argv[2] is the body.
LOAD = """
import json, sys, httpx
with httpx.Client(timeout=300) as http:
    while True:
        http.post(sys.argv[1] + "/v1/images/generations", json=json.loads(sys.argv[2]))
"""
GPU_BOUND = {
    "prompt": "busy",
    "size": "1024x1024",
    "num_inference_steps": 50,
    "n": 2,
    "output_format": "jpeg",
}


def _images(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("zimage_images_generated_total "):
            return float(line.split()[1])
    return 0.0
