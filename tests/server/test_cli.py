"""The installed command, as `make run` starts it: a real process serving on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from zimage_server.core.processes import free_port, free_ports, stop_process
from zimage_server.pipeline.tiny_model import TINY_MODEL_VERSION

pytestmark = pytest.mark.slow


def test_make_tiny_model_writes_a_loadable_pipeline(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "zimage_server", "make-tiny-model", str(tmp_path / "tiny")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "wrote the tiny Z-Image pipeline" in out.stdout
    for part in ("model_index.json", "transformer", "text_encoder", "vae", "tokenizer", "scheduler"):
        assert (tmp_path / "tiny" / part).exists(), part


def test_serve_defaults_to_the_builtin_tiny_model(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "ZIMAGE_CACHE_DIR": str(tmp_path / "cache"), "ZIMAGE_WARMUP_SIZES": "256x256"}
    spawned = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "zimage_server", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url)
        response = httpx.post(f"{url}/generate", json={"prompt": "a red fox", "size": "256x256"}, timeout=60)
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert (tmp_path / "cache" / f"tiny-model-v{TINY_MODEL_VERSION}" / "model_index.json").is_file()
        # The start-up's account begins at the process's start: imports and the HTTP server
        # before loading, no longer than this test has waited since it started the process.
        phases = _startup_phases(url)
        assert 0 < phases["start"] < time.monotonic() - spawned
        # Part of it: the interpreter and the imports (torch, diffusers, the server's modules).
        assert 0 < phases["imports"] < phases["start"]
        assert "cuda_init" not in phases  # a CPU has none to report
        assert {"load", "tune", "warmup"} <= phases.keys()
        assert "warmup_compile" not in phases  # compile is off on a CPU unless asked for
    finally:
        stop_process(proc)
    assert proc.returncode == 0
    assert proc.stdout is not None
    assert "Application shutdown complete" in proc.stdout.read()


def test_sigterm_drains_accepted_work_refuses_new_and_exits_zero(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    port, health_port = free_ports(2)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "zimage_server", "serve", "--port", str(port),
            "--model", str(tiny_model_dir), "--device", "cpu", "--max-batch-size", "1",
            "--batch-wait-ms", "0", "--warmup-sizes", "256x256", "--min-size", "64",
            "--health-port", str(health_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "a queue of foxes", "size": "512x512", "num_inference_steps": 40}
    try:
        deadline = _wait_ready(proc, url) + 120
        with ThreadPoolExecutor(6) as pool:
            accepted = [
                pool.submit(httpx.post, f"{url}/generate", json={**body, "seed": i}, timeout=120)
                for i in range(6)
            ]
            while "zimage_queue_depth 5.0" not in httpx.get(f"{url}/metrics").text:
                assert time.monotonic() < deadline, "the burst never queued up"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert httpx.get(f"{url}/healthz/ready").status_code == 503
            # The health process's answer follows within its publishing period.
            health = httpx.get(f"http://127.0.0.1:{health_port}/healthz/ready")
            assert health.status_code == 503
            assert health.json()["draining"] is True
            refused = httpx.post(f"{url}/generate", json=body, timeout=30)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "draining"
            assert refused.headers["retry-after"] == "1"
            results = [future.result() for future in accepted]
        assert [r.status_code for r in results] == [200] * 6, "an accepted request was lost"
        assert all(r.content.startswith(b"\x89PNG") for r in results)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert proc.stdout is not None
    assert "drained: every accepted request is answered" in proc.stdout.read()
    with pytest.raises(httpx.ConnectError):  # the health process went with the server
        httpx.get(f"http://127.0.0.1:{health_port}/healthz/live")


def _startup_phases(url: str) -> dict[str, float]:
    """The server's own account of its start: ``zimage_startup_seconds`` by phase."""
    return {
        line.split('"')[1]: float(line.split()[-1])
        for line in httpx.get(f"{url}/metrics").text.splitlines()
        if line.startswith("zimage_startup_seconds{")
    }


def _wait_ready(proc: subprocess.Popen[str], url: str, timeout: float = 120) -> float:
    """Wait until the server at ``url`` is ready; when it became ready (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/healthz/ready").status_code == 200:
                return time.monotonic()
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.1)


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "zimage_server", "serve", *args],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_second_sigterm_exits_at_once(tiny_model_dir: Path) -> None:
    port = free_port()
    proc = _start(
        ["--port", str(port), "--model", str(tiny_model_dir), "--device", "cpu", "--min-size", "64",
         "--warmup-sizes", "256x256", "--drain-timeout-s", "120"]
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url)
        long = {"prompt": "a long one", "size": "1024x1024", "num_inference_steps": 50}
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/generate", json=long, timeout=120)
            while "zimage_in_flight_requests 1.0" not in httpx.get(f"{url}/metrics").text:
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)  # drains: would wait for the long request
            time.sleep(0.5)
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            proc.wait(timeout=10)
            took = time.monotonic() - started
            with contextlib.suppress(httpx.TransportError):
                answer = pending.result()
                assert answer.status_code != 500 or answer.headers["content-type"] == "application/json"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 3, f"the second signal took {took:.1f}s"
    assert proc.stdout is not None
    assert "again: exiting now" in proc.stdout.read()


def test_a_model_that_cannot_load_ends_the_process_with_the_reason(tmp_path: Path) -> None:
    empty = tmp_path / "no-model"
    empty.mkdir()
    termination = tmp_path / "termination-log"
    proc = _start(
        ["--port", str(free_port()), "--model", str(empty), "--device", "cpu"],
        {"ZIMAGE_TERMINATION_LOG_PATH": str(termination)},
    )
    try:
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 1
    reason = termination.read_text()
    assert reason.startswith("zimage: the model could not be loaded")
    assert "model_index.json" in reason


def test_sigterm_during_the_warm_up_exits_at_once(tiny_model_dir: Path) -> None:
    """A pod deleted while it compiles: the process ends now, not when the warm-up call does
    (on a GPU a compile can run for minutes, and the kubelet would wait for its grace period)."""
    port = free_port()
    proc = _start(
        [
            "--port", str(port), "--model", str(tiny_model_dir), "--device", "cpu",
            "--warmup-sizes", "2048x2048", "--warmup-steps", "400",
        ]
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
            with contextlib.suppress(httpx.TransportError):
                if '"warming"' in httpx.get(f"{url}/healthz/ready").text:
                    break
            assert time.monotonic() < deadline, "the server never started its warm-up"
            time.sleep(0.1)
        time.sleep(1)  # inside the long warm-up call now
        _stops_at_once(proc)
    finally:
        stop_process(proc)
    _exited_saying(proc, "stopped during start-up: the warm-up is abandoned")


def _stops_at_once(proc: subprocess.Popen[str]) -> None:
    stopped = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert time.monotonic() - stopped < 15


def _exited_saying(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.returncode == 0
    assert proc.stdout is not None
    assert line in proc.stdout.read()


def test_sigterm_while_compiling_beside_the_requests_exits_at_once(tiny_model_dir: Path) -> None:
    """A pod deleted while it compiles after it became ready (serving uncompiled meanwhile):
    drained, it exits now, not when the warm-up call on the compile thread does."""
    port = free_port()
    proc = _start(
        [
            "--port", str(port), "--model", str(tiny_model_dir), "--device", "cpu", "--compile", "true",
            "--warmup-sizes", "2048x2048", "--warmup-steps", "400", "--log-level", "info",
        ]
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url)
        assert httpx.get(f"{url}/load").json()["compile"] == "compiling"
        small = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 2}
        assert httpx.post(f"{url}/v1/images/generations", json=small, timeout=60).status_code == 200
        _stops_at_once(proc)
    finally:
        stop_process(proc)
    _exited_saying(proc, "stopped while compiling: the compile is abandoned")


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_weights_are_read_ahead_of_the_load_when_asked_for(tiny_model_dir: Path, prefetch: bool) -> None:
    port = free_port()
    flags = ["--port", str(port), "--model", str(tiny_model_dir), "--warmup-sizes", "256x256"]
    flags += ["--log-level", "info"] + (["--prefetch-weights"] if prefetch else [])  # off by default
    proc = _start(flags)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url)
        phases = _startup_phases(url)
    finally:
        stop_process(proc)
    assert proc.stdout is not None
    log = proc.stdout.read()
    if prefetch:
        # From the process's start: no longer than the start and the load together.
        assert 0 < phases["weights_prefetch"] <= phases["start"] + phases["load"]
        assert "weight prefetch: read" in log
    else:
        assert "weights_prefetch" not in phases
        assert "weight prefetch" not in log
