"""The VRAM policy and sampler, fed from a narrow fake memory source (no GPU here)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from zimage_server.core.vram_limit import VramLimit
from zimage_server.health.vram import (
    FileSource,
    NvmlSource,
    Sample,
    Verdict,
    VramPolicy,
    visible_device_ids,
    write_termination_message,
)

from .conftest import ServerFactory

GIB = 2**30


def sample(process: float, device: float | None = None, total: float = 80, at: float = 0.0) -> Sample:
    return Sample(
        int(process * GIB),
        int((device if device is not None else process) * GIB),
        int(total * GIB),
        "fake",
        at,
    )


class FakeMemory:
    """A MemorySource whose readings the test sets."""

    def __init__(self, process_gib: float = 10, device_gib: float = 20, total_gib: float = 80) -> None:
        self.process_gib, self.device_gib, self.total_gib = process_gib, device_gib, total_gib
        self.reads = 0

    @property
    def unavailable_reason(self) -> str | None:
        return None

    def read(self) -> Sample:
        self.reads += 1
        return sample(self.process_gib, self.device_gib, self.total_gib, at=time.time())


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [
        ("70Gi", 0, 70 * GIB),
        ("512Mi", 0, 512 * 2**20),
        ("90%", 80 * GIB, int(0.9 * 80 * GIB)),
        ("1000", 0, 1000),
        ("1.5G", 0, 1_500_000_000),
    ],
)
def test_limits_are_bytes_or_percent(text: str, total: int, expected: int) -> None:
    assert VramLimit.parse(text).resolve(total) == expected


@pytest.mark.parametrize("text", ["lots", "90 %%", "0%", "150%", "-5Gi", "0", "70GB"])
def test_bad_limits_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="VRAM"):
        VramLimit.parse(text)


def test_k_consecutive_samples_over_the_limit_fail() -> None:
    policy = VramPolicy(VramLimit.parse("50Gi"), "process", consecutive=3)
    assert [policy.observe(sample(60, at=t)).over for t in range(3)] == [False, False, True]
    assert policy.over_since == 2


def test_a_dip_below_the_limit_resets_the_count() -> None:
    policy = VramPolicy(VramLimit.parse("50Gi"), "process", consecutive=3)
    readings = [60, 60, 40, 60, 60]
    assert not any(policy.observe(sample(v)).over for v in readings)


def test_the_scope_picks_the_figure() -> None:
    device = VramPolicy(VramLimit.parse("50%"), "device", consecutive=1)
    process = VramPolicy(VramLimit.parse("50%"), "process", consecutive=1)
    reading = sample(10, device=70, total=80)
    assert device.observe(reading).over is True
    assert process.observe(reading).over is False


def test_the_allocator_cache_is_released_once_before_failing() -> None:
    released: list[int] = []
    after = [sample(30)]  # releasing the cache brings it under the limit
    policy = VramPolicy(
        VramLimit.parse("50Gi"),
        "process",
        consecutive=2,
        release_cache=lambda: released.append(1),
        remeasure=lambda: after[0],
    )
    assert [policy.observe(sample(60)).over for _ in range(2)] == [False, False]
    assert released == [1]
    after[0] = sample(60)  # this time it does not help
    assert [policy.observe(sample(60)).over for _ in range(2)] == [False, True]
    assert released == [1, 1]


def test_recovery_needs_k_samples_under_the_hysteresis_band() -> None:
    policy = VramPolicy(VramLimit.parse("50Gi"), "process", consecutive=2, hysteresis=0.1)
    for _ in range(2):
        policy.observe(sample(60))
    assert policy.observe(sample(48)).over is True, "under the limit but inside the band"
    assert policy.observe(sample(44)).over is True
    assert policy.observe(sample(44)).over is False


def test_without_recovery_the_failure_sticks() -> None:
    policy = VramPolicy(VramLimit.parse("50Gi"), "process", consecutive=1, recover=False)
    policy.observe(sample(60))
    assert all(policy.observe(sample(1)).over for _ in range(5))


def test_the_termination_message_says_why(tmp_path: Path) -> None:
    path = tmp_path / "termination-log"
    write_termination_message(str(path), Verdict(True, 75 * GIB, 72 * GIB, 0.0), "device")
    assert path.read_text() == "zimage: VRAM limit exceeded (device): 75.00 GiB used, limit 72.00 GiB\n"


def test_the_policy_reports_the_decision_once() -> None:
    decided: list[Verdict] = []
    policy = VramPolicy(VramLimit.parse("1Gi"), "process", consecutive=1, on_over=decided.append)
    policy.observe(sample(2))
    policy.observe(sample(2))
    assert len(decided) == 1, "reported once, when the state changes"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("0,1", ["0", "1"]),
        ("GPU-aaaa, MIG-bbbb", ["GPU-aaaa", "MIG-bbbb"]),
        ("2,-1,3", ["2"]),
        ("", []),
    ],
)
def test_cuda_visible_devices_parsing(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: list[str] | None
) -> None:
    if value is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert visible_device_ids() == expected


class FakeNvml:
    """Just the NVML calls NvmlSource makes, for three GPUs."""

    def __init__(self, pid: int, fail_init: bool = False) -> None:
        self.pid = pid
        self.fail_init = fail_init
        self.devices = {
            "GPU-0": SimpleNamespace(used=10 * GIB, total=80 * GIB, procs=[(pid, 6 * GIB), (1, 4 * GIB)]),
            "GPU-1": SimpleNamespace(used=30 * GIB, total=80 * GIB, procs=[(2, 30 * GIB)]),
            "MIG-2": SimpleNamespace(used=5 * GIB, total=20 * GIB, procs=[(pid, 5 * GIB)]),
        }

    def nvmlInit(self) -> None:  # noqa: N802 (NVML's names)
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 3

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        return list(self.devices)[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:  # noqa: N802
        return uuid

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:  # noqa: N802
        return self.devices[handle]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:  # noqa: N802
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.devices[handle].procs]


def test_nvml_maps_visible_indices_to_handles(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    reading = NvmlSource(nvml=FakeNvml(os.getpid())).read()
    assert reading is not None
    assert (reading.process_bytes, reading.device_bytes, reading.total_bytes) == (
        6 * GIB,
        40 * GIB,
        160 * GIB,
    )
    assert reading.source == "nvml"


def test_nvml_maps_mig_uuids(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-2")
    reading = NvmlSource(nvml=FakeNvml(os.getpid())).read()
    assert reading is not None
    assert (reading.process_bytes, reading.device_bytes, reading.total_bytes) == (5 * GIB, 5 * GIB, 20 * GIB)


def test_a_process_nvml_cannot_see_falls_back_to_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # our pid is not among GPU 1's processes
    reading = NvmlSource(nvml=FakeNvml(pid=-1)).read()
    assert reading is not None
    assert reading.source == "nvml+torch"
    assert reading.device_bytes == 30 * GIB


def test_without_nvml_the_source_says_so() -> None:
    source = NvmlSource(nvml=FakeNvml(0, fail_init=True))
    assert source.read() is None
    assert "NVML is not available" in (source.unavailable_reason or "")


def test_liveness_follows_the_vram_verdict(serve: ServerFactory, tmp_path: Path) -> None:
    memory = FakeMemory(process_gib=10)
    server = serve(
        memory_source=memory,
        vram_limit="40Gi",
        vram_consecutive=2,
        vram_sample_period_s=0.05,
        termination_log_path=str(tmp_path / "termination-log"),
    )
    live = httpx.get(f"{server.url}/healthz/live")
    assert live.status_code == 200
    assert live.json()["vram"]["over_limit"] is False

    memory.process_gib = 45
    live = server.wait_live(503, timeout=5)
    assert live.status_code == 503
    vram = live.json()["vram"]
    assert vram["over_limit"] is True
    assert (vram["scope"], vram["used_bytes"], vram["limit_bytes"]) == ("process", 45 * GIB, 40 * GIB)
    assert "since" in vram
    assert "VRAM limit exceeded (process)" in (tmp_path / "termination-log").read_text()
    assert server.metrics()["zimage_vram_over_limit"] == 1
    assert server.metrics()["zimage_vram_limit_bytes"] == 40 * GIB

    memory.process_gib = 10
    server.wait_metric("zimage_vram_over_limit", lambda v: v == 0, timeout=5)
    assert httpx.get(f"{server.url}/healthz/live").status_code == 200


def test_without_a_gpu_liveness_does_not_fail(server: Any) -> None:
    live = httpx.get(f"{server.url}/healthz/live")
    assert live.status_code == 200
    assert live.json()["vram"]["available"] is False


def test_the_file_source_drills_the_restart_loop_without_a_gpu(serve: ServerFactory, tmp_path: Path) -> None:
    """`vram_source=file`: figures written into a file push use over the limit; liveness fails
    and the termination message names the limit, as with NVML; back under, it passes again."""
    figures = tmp_path / "vram.json"
    server = serve(
        vram_source="file",
        vram_source_file=str(figures),
        vram_limit="1Gi",
        vram_consecutive=2,
        vram_sample_period_s=0.05,
        termination_log_path=str(tmp_path / "termination-log"),
    )
    live = httpx.get(f"{server.url}/healthz/live")
    assert live.status_code == 200, "no file yet: nothing is used"
    assert live.json()["vram"]["available"] is True

    figures.write_text('{"process_bytes": 2147483648}')
    server.wait_metric("zimage_vram_over_limit", lambda v: v == 1, timeout=5)
    live = httpx.get(f"{server.url}/healthz/live")
    assert live.status_code == 503
    assert (live.json()["vram"]["used_bytes"], live.json()["vram"]["limit_bytes"]) == (2 * GIB, GIB)
    assert "VRAM limit exceeded (process)" in (tmp_path / "termination-log").read_text()

    figures.write_text("not json")  # a broken file measures nothing: no crash, no verdict change
    time.sleep(0.3)
    figures.write_text('{"process_bytes": 0}')
    server.wait_metric("zimage_vram_over_limit", lambda v: v == 0, timeout=5)
    assert httpx.get(f"{server.url}/healthz/live").status_code == 200


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"process_bytes": 5}', (5, 5, 80 * GIB)),
        ('{"process_bytes": 5, "device_bytes": 7, "total_bytes": 9}', (5, 7, 9)),
        (None, (0, 0, 80 * GIB)),
        ("[1, 2]", None),
        ('{"process_bytes": -1}', None),
        ('{"process_bytes": "lots"}', None),
    ],
)
def test_the_file_source_reads_figures_or_nothing(
    tmp_path: Path, content: str | None, expected: tuple[int, int, int] | None
) -> None:
    path = tmp_path / "vram.json"
    source = FileSource(str(path))
    if content is not None:
        path.write_text(content)
    got = source.read()
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert (got.process_bytes, got.device_bytes, got.total_bytes, got.source) == (*expected, "file")


def test_the_file_source_ignores_figures_from_before_the_server_started(tmp_path: Path) -> None:
    """The drill's file outlives the container it got restarted (it sits in an emptyDir): the
    restarted server must not fail for it again, only for figures written after it started."""
    path = tmp_path / "vram.json"
    path.write_text('{"process_bytes": 5}')
    os.utime(path, (time.time() - 30, time.time() - 30))
    source = FileSource(str(path))
    got = source.read()
    assert got is not None
    assert got.process_bytes == 0
    path.write_text('{"process_bytes": 7}')
    got = source.read()
    assert got is not None
    assert got.process_bytes == 7


def test_the_other_ranks_memory_counts_on_their_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    # Sequence parallel: pid 2 is the rank on GPU 1.
    reading = NvmlSource(nvml=FakeNvml(os.getpid()), also=lambda: [2]).read()
    assert reading is not None
    assert {gpu.gpu: gpu.process_bytes for gpu in reading.per_gpu()} == {"0": 6 * GIB, "1": 30 * GIB}


def test_where_nvml_sees_no_rank_the_other_ranks_gpus_count_what_is_on_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    # A PID namespace: NVML names none of the ranks; this process has reserved nothing on GPU 1,
    # which the replica has to itself, so what is on it is the other rank's.
    reading = NvmlSource(nvml=FakeNvml(pid=-1), also=lambda: [99999]).read()
    assert reading is not None
    assert reading.source == "nvml+torch"
    assert {gpu.gpu: gpu.process_bytes for gpu in reading.per_gpu()}["1"] == 30 * GIB
    alone = NvmlSource(nvml=FakeNvml(pid=-1)).read()  # no other ranks: PyTorch's figure alone
    assert alone is not None
    assert {gpu.gpu: gpu.process_bytes for gpu in alone.per_gpu()}["1"] == 0
