"""Fixtures that run the real server, with the real tiny pipeline, over real HTTP on loopback."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from zimage_server.core.config import Settings
from zimage_server.core.state import Phase
from zimage_server.http.app import create_app
from zimage_server.http.http_server import uvicorn_config
from zimage_server.pipeline.tiny_model import make_tiny_model

# A snapshot's commit in a Hub cache laid out by hand (``hub_cache``).
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, tiny_model_dir: Path, repo: str = "acme/tiny-zimage") -> Path:
    """Lay the tiny model out the way huggingface_hub caches a downloaded snapshot."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    shutil.copytree(tiny_model_dir, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


# A request that keeps the tiny model busy for a second or more on a 2-core machine.
SLOW = {"size": "1024x1024", "num_inference_steps": 30}


def pixel_difference(image: Any, reference: Any) -> np.ndarray:
    """Per-value absolute difference of two 8-bit images (PIL images or arrays of 0-255)."""
    return np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reference, dtype=np.int16))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


class RunningServer:
    def __init__(self, settings: Settings, memory_source: Any = None) -> None:
        self.settings = settings
        self.app = create_app(settings, memory_source=memory_source)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._sock = sock
        config = uvicorn_config(self.app, settings, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 600) -> None:
        # Generous: on a GPU, start-up compiles the model (about a minute and a half even
        # for the tiny one); a server that never gets ready still fails here.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(f"{self.url}/healthz/ready").status_code == 200:
                return
            state = self.app.state.server_state
            if state.phase is Phase.FAILED:  # the command line would have ended the process
                raise RuntimeError(f"the server failed to start: {state.detail}")
            time.sleep(0.05)
        raise RuntimeError("the server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self._sock.close()
        assert not self.thread.is_alive(), "the server thread did not stop"

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as ``name{label="value",...}`` -> value."""
        text = httpx.get(f"{self.url}/metrics").text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def wait_metric(self, name: str, predicate: Callable[[float], bool], timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.metrics().get(name, 0.0)
            if predicate(value):
                return value
            time.sleep(0.02)
        raise AssertionError(f"{name} never met the condition (last value {self.metrics().get(name)})")

    def wait_live(self, status: int, timeout: float = 10) -> httpx.Response:
        """Poll /healthz/live until it answers ``status``; the last answer (checked by the caller)."""
        deadline = time.monotonic() + timeout
        while (live := httpx.get(f"{self.url}/healthz/live")).status_code != status:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return live

    def wait_idle(self) -> None:
        self.wait_metric("zimage_in_flight_requests", lambda v: v == 0)
        self.wait_metric("zimage_queue_depth", lambda v: v == 0)


ServerFactory = Callable[..., RunningServer]


@pytest.fixture
def serve(tiny_model_dir: Path) -> Iterator[ServerFactory]:
    """Start a server on a free loopback port with the given settings; stopped after the test."""
    started: list[RunningServer] = []

    def start(wait_ready: bool = True, memory_source: Any = None, **overrides: Any) -> RunningServer:
        # The CPU by default: the timing-based tests count on the tiny model's CPU speed.
        values: dict[str, Any] = {
            "model": str(tiny_model_dir),
            "device": "cpu",
            "warmup_sizes": ["256x256"],
            "min_size": 64,
        }
        values.update(overrides)
        server = RunningServer(Settings(_env_file=None, **values), memory_source)
        started.append(server)
        server.start()
        if wait_ready:
            server.wait_ready()
        return server

    yield start
    for server in started:
        with contextlib.suppress(Exception):
            server.stop()


@pytest.fixture
def server(serve: ServerFactory) -> RunningServer:
    """A default server: batches of up to 4, a short batch wait."""
    return serve()
