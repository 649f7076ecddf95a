"""Multi-GPU replicas on the CPU: several pipeline workers behind one queue (data parallel), and
one image made by two processes together (sequence parallel, gloo), with the tiny model."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from zimage_server.core.config import Settings
from zimage_server.core.processes import free_port
from zimage_server.health.vram import GpuMemory, Sample

from .conftest import SLOW, RunningServer, ServerFactory, pixel_difference

pytestmark = pytest.mark.slow

GIB = 2**30


def _post(server: RunningServer, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=timeout)


def _image(response: httpx.Response, index: int = 0) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["data"][index]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


# -- data parallel ------------------------------------------------------------------------------


def test_two_workers_serve_two_batches_at_once(serve: ServerFactory) -> None:
    server = serve(workers=2, max_batch_size=1, batch_wait_ms=0)
    load = httpx.get(f"{server.url}/load").json()
    assert (load["workers"], load["busy_workers"]) == (2, 0)
    assert server.metrics()["zimage_workers"] == 2
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_post, server, {"prompt": f"a lake {i}", **SLOW, "seed": i}) for i in range(2)]
        # Both requests run at the same time, one on each worker.
        server.wait_metric("zimage_in_flight_requests", lambda v: v == 2, timeout=60)
        busy = httpx.get(f"{server.url}/load").json()["busy_workers"]
        responses = [future.result() for future in futures]
    assert busy == 2
    assert [r.status_code for r in responses] == [200, 200]
    metrics = server.metrics()
    assert metrics['zimage_gpu_images_generated_total{gpu="cpu0"}'] == 1
    assert metrics['zimage_gpu_images_generated_total{gpu="cpu1"}'] == 1
    assert metrics["zimage_images_generated_total"] == 2
    assert metrics['zimage_gpu_busy_seconds_total{gpu="cpu1"}'] > 0


def test_a_seed_gives_the_same_image_on_every_worker(serve: ServerFactory) -> None:
    server = serve(workers=2, max_batch_size=1, batch_wait_ms=0)
    body = {"prompt": "a red door", "size": "256x256", "num_inference_steps": 4, "seed": 11}
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda _: _post(server, body), range(2)))
    metrics = server.metrics()
    assert metrics['zimage_gpu_images_generated_total{gpu="cpu0"}'] == 1, "each worker made one"
    assert pixel_difference(_image(responses[0]), _image(responses[1])).max() == 0


def test_a_full_queue_names_the_wait_of_the_first_worker_to_free(serve: ServerFactory) -> None:
    server = serve(workers=2, max_batch_size=1, batch_wait_ms=0, max_queue=1)
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(_post, server, {"prompt": "a hill", **SLOW}) for _ in range(2)]
        server.wait_metric("zimage_in_flight_requests", lambda v: v == 2, timeout=60)
        queued = pool.submit(_post, server, {"prompt": "a hill", **SLOW})
        server.wait_metric("zimage_queue_depth", lambda v: v == 1)
        refused = _post(server, {"prompt": "one too many", **SLOW})
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert [f.result().status_code for f in [*running, queued]] == [200] * 3


def test_workers_and_sequence_parallel_are_one_or_the_other() -> None:
    with pytest.raises(ValidationError, match="cannot both be above 1"):
        Settings(_env_file=None, workers=2, sequence_parallel=2)
    with pytest.raises(ValidationError, match="names one GPU"):
        Settings(_env_file=None, workers=2, device="cuda:1")
    with pytest.raises(ValidationError, match="cannot replay the transformer"):
        Settings(_env_file=None, sequence_parallel=2, cuda_graph_parts=["text_encoder", "transformer"])
    # Graphs off: the parts are not used, so nothing to refuse.
    Settings(_env_file=None, sequence_parallel=2, cuda_graphs=False, cuda_graph_parts=["transformer"])


class TwoGpus:
    """A MemorySource for two GPUs of 80 GiB; the test sets GPU 1's use."""

    def __init__(self) -> None:
        self.gpu1_gib = 10.0

    @property
    def unavailable_reason(self) -> str | None:
        return None

    def read(self) -> Sample:
        gpus = [
            GpuMemory("0", 10 * GIB, 12 * GIB, 80 * GIB),
            GpuMemory(str(1), int(self.gpu1_gib * GIB), 0, 80 * GIB),
        ]
        return Sample.of(gpus, "fake", time.time())


def test_liveness_fails_when_one_gpu_passes_its_limit_and_names_it(
    serve: ServerFactory, tmp_path: Path
) -> None:
    memory = TwoGpus()
    log = tmp_path / "termination-log"
    server = serve(
        memory_source=memory,
        vram_limit="50%",
        vram_consecutive=1,
        vram_sample_period_s=0.05,
        termination_log_path=str(log),
    )
    live = httpx.get(f"{server.url}/healthz/live")
    assert live.status_code == 200
    assert [gpu["gpu"] for gpu in live.json()["vram"]["gpus"]] == ["0", "1"]
    metrics = server.metrics()
    assert metrics['zimage_vram_used_bytes{gpu="1",scope="process"}'] == 10 * GIB
    assert metrics['zimage_vram_used_bytes{gpu="0",scope="device"}'] == 12 * GIB
    memory.gpu1_gib = 41  # over half of GPU 1; the sum over both (51 of 160 GiB) is not
    live = server.wait_live(503, timeout=10)
    assert live.status_code == 503
    vram = live.json()["vram"]
    assert (vram["over_limit"], vram["gpu"], vram["used_bytes"], vram["limit_bytes"]) == (
        True,
        "1",
        41 * GIB,
        40 * GIB,
    )
    assert (
        log.read_text() == "zimage: VRAM limit exceeded (process) on GPU 1: 41.00 GiB used, limit 40.00 GiB\n"
    )


# -- sequence parallel --------------------------------------------------------------------------


def _followers(server: RunningServer) -> list[int]:
    return list(server.app.state.runner.follower_pids())


def _tcp_addresses(pid: int) -> set[str]:
    """The local and remote IPv4 addresses of process ``pid``'s TCP sockets (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                for end in fields[1:3]:
                    ip = end.split(":")[0]
                    if len(ip) == 8:  # IPv4, little-endian hex
                        addresses.add(".".join(str(int(ip[i - 2 : i], 16)) for i in (8, 6, 4, 2)))
                    else:  # IPv6 (and IPv4-mapped): keep the hex, loopback checked below
                        addresses.add(ip)
    return addresses


def _loopback(address: str) -> bool:
    return (
        address.startswith("127.")
        or address
        in (
            "0.0.0.0",
            "00000000000000000000000001000000",  # ::1
            "00000000000000000000000000000000",  # ::
        )
        or address.endswith("0100007F")
    )  # ::ffff:127.0.0.1


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_ranks_make_the_image_one_process_makes(serve: ServerFactory) -> None:
    bodies = [
        {"prompt": "a lighthouse at dusk", "size": "256x256", "num_inference_steps": 4, "seed": 5},
        # Two prompts of different lengths batched together: the padded, masked attention.
        {"prompt": "a boat", "size": "256x256", "num_inference_steps": 4, "seed": 6},
        {
            "prompt": "a much longer prompt about a boat on a grey sea under heavy rain",
            "size": "256x256",
            "num_inference_steps": 4,
            "seed": 7,
        },
    ]

    def images(server: RunningServer) -> list[np.ndarray]:
        first = _image(_post(server, bodies[0]))
        with ThreadPoolExecutor(2) as pool:  # the batch wait puts these two in one batch
            pair = list(pool.map(lambda body: _post(server, body), bodies[1:]))
        return [first, *(_image(response) for response in pair)]

    single = serve(max_batch_size=2, batch_wait_ms=1500)
    expected = images(single)
    single.stop()
    parallel = serve(sequence_parallel=2, parallel_port=free_port(), max_batch_size=2, batch_wait_ms=1500)
    assert httpx.get(f"{parallel.url}/load").json()["sequence_parallel"] == 2
    got = images(parallel)
    assert parallel.metrics()["zimage_batch_size_count"] == 2, "the two prompts ran as one batch"
    for want, have in zip(expected, got, strict=True):
        assert pixel_difference(want, have).max() <= 2, "the two ranks made the one-process image"
    followers = _followers(parallel)
    assert len(followers) == 1
    assert _running(followers[0])
    # The ranks talk over loopback only: every TCP socket of the other rank, both ends.
    addresses = _tcp_addresses(followers[0])
    assert addresses, "the other rank holds its connections to rank 0"
    assert all(_loopback(address) for address in addresses), addresses
    parallel.stop()
    deadline = time.monotonic() + 20
    while _running(followers[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(followers[0]), "stopping the server ends the other rank"


def test_liveness_fails_when_a_rank_exits(serve: ServerFactory) -> None:
    server = serve(sequence_parallel=2, parallel_port=free_port())
    assert httpx.get(f"{server.url}/healthz/live").status_code == 200
    (follower,) = _followers(server)
    os.kill(follower, signal.SIGKILL)
    live = server.wait_live(503, timeout=10)
    assert live.status_code == 503
    assert live.json()["engine_alive"] is False
    refused = _post(server, {"prompt": "after the loss", "size": "256x256", "num_inference_steps": 2})
    assert refused.status_code >= 500
    assert "rank 1 has exited" in refused.json()["error"]["message"]


# -- on a GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
def test_one_gpu_is_one_worker_read_through_nvml(serve: ServerFactory) -> None:
    import torch

    if torch.cuda.device_count() != 1:
        pytest.skip("checks the one-GPU case")
    server = serve(device="auto", vram_limit="95%", vram_sample_period_s=0.2)
    load = httpx.get(f"{server.url}/load").json()
    assert (load["workers"], load["sequence_parallel"]) == (1, 1)
    response = _post(server, {"prompt": "a lamp", "size": "256x256", "num_inference_steps": 2})
    assert response.status_code == 200
    metrics = server.metrics()
    assert metrics["zimage_workers"] == 1
    assert metrics['zimage_gpu_images_generated_total{gpu="0"}'] == 1
    time.sleep(0.5)
    vram = httpx.get(f"{server.url}/healthz/live").json()["vram"]
    assert vram["available"] is True
    assert vram["process_bytes"] > 0, vram
    assert "gpus" not in vram, "one GPU: the report of one"
    assert "gpu" not in vram
    assert metrics['zimage_vram_used_bytes{gpu="0",scope="process"}'] > 0


@pytest.mark.gpu
def test_several_workers_on_one_gpu_are_refused_at_start() -> None:
    import torch

    from zimage_server.pipeline.runner import worker_devices

    visible = torch.cuda.device_count()
    with pytest.raises(RuntimeError, match=f"needs {visible + 1} GPUs, one each; {visible} (is|are) visible"):
        worker_devices(Settings(_env_file=None, device="cuda", workers=visible + 1))
    with pytest.raises(RuntimeError, match="needs as many GPUs"):
        worker_devices(Settings(_env_file=None, device="cuda", sequence_parallel=visible + 1))
