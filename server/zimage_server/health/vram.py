"""VRAM pressure: a background sampler reads GPU memory, a policy decides when the process is
over its limit, and the liveness probe reports that decision so the kubelet restarts the pod.

The sampler reads through a narrow ``MemorySource`` interface. ``NvmlSource`` is the real one
(NVML via ``pynvml``); ``FileSource`` (setting ``vram_source=file``) reads figures that someone
writes into a file, to drill the restart loop where there is no GPU (the local cluster's kubelet
node, a staging cluster): the probe, the kubelet's restart, the termination message, the
operator's event. Unit tests feed the policy from a fake source.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from zimage_server.core.state import write_termination_log
from zimage_server.core.vram_limit import VramLimit

logger = logging.getLogger(__name__)

Scope = Literal["process", "device"]


@dataclass(frozen=True)
class GpuMemory:
    """Memory on one GPU; ``gpu`` is its CUDA index as this process sees it."""

    gpu: str
    process_bytes: int
    device_bytes: int
    total_bytes: int

    def used(self, scope: Scope) -> int:
        return self.process_bytes if scope == "process" else self.device_bytes


@dataclass(frozen=True)
class Sample:
    """Memory on this process's GPUs: the sums, and each GPU in ``gpus`` (empty: one GPU)."""

    process_bytes: int
    device_bytes: int
    total_bytes: int
    source: str  # "nvml", "nvml+torch" (process bytes from PyTorch), "torch", "file"
    at: float
    gpus: tuple[GpuMemory, ...] = ()

    def used(self, scope: Scope) -> int:
        return self.process_bytes if scope == "process" else self.device_bytes

    def per_gpu(self) -> tuple[GpuMemory, ...]:
        return self.gpus or (GpuMemory("0", self.process_bytes, self.device_bytes, self.total_bytes),)

    @classmethod
    def of(cls, gpus: list[GpuMemory], source: str, at: float) -> Sample:
        return cls(
            sum(gpu.process_bytes for gpu in gpus),
            sum(gpu.device_bytes for gpu in gpus),
            sum(gpu.total_bytes for gpu in gpus),
            source,
            at,
            tuple(gpus),
        )


class MemorySource(Protocol):
    def read(self) -> Sample | None:
        """The current sample, or None when there is nothing to measure."""

    @property
    def unavailable_reason(self) -> str | None:
        """Why there is nothing to measure (no GPU, no NVML), or None."""


# -- the policy -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    over: bool
    used_bytes: int
    limit_bytes: int
    since: float | None  # when the over-limit state began
    # With several GPUs, the one these figures are of: the one nearest to (or over) its limit.
    gpu: str | None = None


class VramPolicy:
    """Over the limit for ``consecutive`` samples in a row -> over. Before declaring it, the
    allocator's cache is released once and memory read again. With ``recover``, the state
    clears after ``consecutive`` samples below ``limit * (1 - hysteresis)``.

    The limit holds for each GPU on its own (a percentage of that GPU's memory): with several,
    each sample is judged by the GPU nearest to its limit, so one GPU over it is enough."""

    def __init__(
        self,
        limit: VramLimit,
        scope: Scope,
        consecutive: int = 3,
        recover: bool = True,
        hysteresis: float = 0.05,
        release_cache: Callable[[], None] | None = None,
        remeasure: Callable[[], Sample | None] | None = None,
        on_over: Callable[[Verdict], None] | None = None,
    ) -> None:
        self.limit = limit
        self.scope = scope
        self.consecutive = consecutive
        self.recover = recover
        self.hysteresis = hysteresis
        self.release_cache = release_cache
        self.remeasure = remeasure
        self.on_over = on_over
        self._above = 0
        self._below = 0
        self.over_since: float | None = None
        self.last: Verdict | None = None

    def _worst(self, sample: Sample) -> tuple[str | None, int, int]:
        """The GPU nearest to its limit: (its label, None with one GPU; bytes used; its limit)."""
        gpus = sample.per_gpu()
        figures = [(gpu.gpu, gpu.used(self.scope), self.limit.resolve(gpu.total_bytes)) for gpu in gpus]
        label, used, limit = max(figures, key=lambda figure: figure[1] / max(1, figure[2]))
        return (label if len(gpus) > 1 else None), used, limit

    def observe(self, sample: Sample) -> Verdict:
        gpu, used, limit = self._worst(sample)
        if self.over_since is None:
            self._above = self._above + 1 if used > limit else 0
            if self._above >= self.consecutive:
                used = self._after_release(gpu, used)
                if used > limit:
                    self.over_since = sample.at
                    self._below = 0
                    verdict = Verdict(True, used, limit, self.over_since, gpu)
                    if self.on_over is not None:
                        self.on_over(verdict)
                    self.last = verdict
                    return verdict
                self._above = 0
        elif self.recover:
            self._below = self._below + 1 if used < limit * (1 - self.hysteresis) else 0
            if self._below >= self.consecutive:
                logger.warning("VRAM back under the limit: %d of %d bytes (%s)", used, limit, self.scope)
                self.over_since = None
                self._above = 0
        self.last = Verdict(self.over_since is not None, used, limit, self.over_since, gpu)
        return self.last

    def _after_release(self, gpu: str | None, used: int) -> int:
        if self.release_cache is None:
            return used
        self.release_cache()
        again = self.remeasure() if self.remeasure is not None else None
        after = used
        if again is not None:
            gpus = again.per_gpu()
            after = next((each.used(self.scope) for each in gpus if gpu is None or each.gpu == gpu), used)
        logger.warning(
            "VRAM over the limit%s; released the allocator cache: %d -> %d bytes",
            f" on GPU {gpu}" if gpu is not None else "",
            used,
            after,
        )
        return after


def write_termination_message(path: str, verdict: Verdict, scope: Scope) -> None:
    """One line that ``kubectl describe pod`` shows as the reason the container ended; with
    several GPUs it names the one over its limit."""
    gib = 2**30
    where = f" on GPU {verdict.gpu}" if verdict.gpu is not None else ""
    line = (
        f"zimage: VRAM limit exceeded ({scope}){where}: {verdict.used_bytes / gib:.2f} GiB used, "
        f"limit {verdict.limit_bytes / gib:.2f} GiB"
    )
    write_termination_log(path, line)


# -- NVML -------------------------------------------------------------------------------------


def visible_device_ids() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of indices or UUIDs; None when unset (all devices)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    ids = []
    for part in value.split(","):
        part = part.strip()
        if not part or part.startswith("-"):
            break  # CUDA stops at the first invalid entry
        ids.append(part)
    return ids


class NvmlSource:
    """Reads the memory of the GPUs this process uses, as NVML sees them.

    NVML ignores CUDA_VISIBLE_DEVICES, so the visible devices (indices, GPU-... or MIG-...
    UUIDs) are mapped to NVML handles here. A process inside a PID namespace does not find
    itself in NVML's process list; then the process figure comes from PyTorch's allocator.
    Where NVML cannot read a device (some MIG setups), ``torch.cuda.mem_get_info`` is used.
    """

    def __init__(
        self,
        nvml: Any = None,
        cuda_devices: list[int] | None = None,
        also: Callable[[], list[int]] | None = None,
    ) -> None:
        self._also = also  # other processes whose memory counts as this one's (sequence-parallel ranks)
        self._reason: str | None = None
        self._handles: list[Any] = []
        self._nvml = nvml
        self._cuda_devices = cuda_devices or []
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
        except Exception as exc:  # no library, no driver, no GPU
            # The probes answer the reason to anyone: the exception (library paths) goes to the log.
            logger.info("NVML is not available: %s", exc)
            self._reason = "NVML is not available (no driver or no GPU); the server log says more"
            self._nvml = None
            return
        try:
            self._handles = self._map_devices()
        except Exception as exc:
            logger.warning("NVML could not map the visible devices: %s", exc)
            self._reason = "NVML could not map the visible devices; the server log says why"
        if not self._handles and self._reason is None:
            self._reason = "no GPU is visible to this process"

    @property
    def unavailable_reason(self) -> str | None:
        return self._reason

    def _map_devices(self) -> list[Any]:
        nvml = self._nvml
        ids = visible_device_ids()
        if ids is None:
            return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        handles = []
        for ident in ids:
            if ident.startswith(("GPU-", "MIG-")):
                handles.append(nvml.nvmlDeviceGetHandleByUUID(ident))
            else:
                handles.append(nvml.nvmlDeviceGetHandleByIndex(int(ident)))
        return handles

    def read(self) -> Sample | None:
        if self._reason is not None or self._nvml is None:
            return None
        nvml = self._nvml
        pids = {os.getpid(), *(self._also() if self._also is not None else [])}
        found_self = False
        source = "nvml"
        gpus = []
        for index, handle in enumerate(self._handles):
            try:
                info = _memory_info(nvml, handle)
                device, total = int(info.used), int(info.total)
            except Exception:
                free, total = _torch_mem_get_info(index)
                device = total - free
                source = "torch"
            process = 0
            try:
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid in pids and proc.usedGpuMemory is not None:
                        process += int(proc.usedGpuMemory)
                        found_self = True
            except Exception:
                pass
            gpus.append(GpuMemory(str(index), process, device, total))
        if not found_self:
            # NVML cannot see this process (a PID namespace): PyTorch's reserved memory stands in.
            # It knows nothing of the other sequence-parallel ranks, so a GPU this process does
            # not use counts what is on it: the replica has its GPUs to itself, so that is theirs.
            others = len(pids) > 1
            fallback = []
            for gpu in gpus:
                reserved = _torch_reserved(int(gpu.gpu))
                process = gpu.device_bytes if others and reserved == 0 else reserved
                fallback.append(GpuMemory(gpu.gpu, process, gpu.device_bytes, gpu.total_bytes))
            gpus = fallback
            source = "nvml+torch" if source == "nvml" else source
        return Sample.of(gpus, source, time.time())


def _memory_info(nvml: Any, handle: Any) -> Any:
    """Memory info without the driver's reserved memory (NVML's v2 struct), as nvidia-smi
    reports it; the v1 struct counts that reservation as used."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except Exception:
            pass
    return nvml.nvmlDeviceGetMemoryInfo(handle)


def _torch_mem_get_info(index: int) -> tuple[int, int]:
    import torch

    free, total = torch.cuda.mem_get_info(index)
    return int(free), int(total)


def _torch_reserved(index: int) -> int:
    """What PyTorch's allocator holds on visible GPU ``index`` (0 before CUDA starts)."""
    try:
        import torch

        initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        if not torch.cuda.is_available() or not initialized or index >= torch.cuda.device_count():
            return 0
        return int(torch.cuda.memory_reserved(index))
    except Exception:
        return 0


def release_torch_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            for index in range(torch.cuda.device_count()):
                if torch.cuda.memory_reserved(index):  # a GPU this process never used is left alone
                    with torch.cuda.device(index):
                        torch.cuda.empty_cache()
    except Exception as exc:
        logger.warning("could not release the CUDA allocator cache: %s", exc)


# -- the sampler ----------------------------------------------------------------------------------


class FileSource:
    """GPU memory figures read from a JSON file at each sample: ``{"process_bytes": N}``, with
    optional ``device_bytes`` (default: the process figure) and ``total_bytes`` (default
    80 GiB); or ``{"gpus": [{...}, {...}]}``, the same figures for each GPU in turn. No file
    means nothing is used yet; a file that does not parse is logged and
    measures nothing (liveness then passes, as without a GPU). Only a file written after this
    source was made counts: the container that a drill's file got restarted finds it still
    there (the folder outlives the container) and must not fail again for it."""

    DEFAULT_TOTAL = 80 * 2**30
    CLOCK_SLACK_S = 1.0

    def __init__(self, path: str) -> None:
        self.path = path
        self.since = time.time()
        self._complained = False

    @property
    def unavailable_reason(self) -> str | None:
        return None

    def read(self) -> Sample | None:
        try:
            with open(self.path, encoding="utf-8") as figures:
                # From before this server: ignored. The slack covers the file system's coarse clock.
                if os.fstat(figures.fileno()).st_mtime < self.since - self.CLOCK_SLACK_S:
                    raise FileNotFoundError(self.path)
                data = json.load(figures)
            each = data["gpus"] if isinstance(data, dict) and "gpus" in data else [data]
            if not isinstance(each, list) or not each:
                raise ValueError("gpus must be a list of figures, one per GPU")
            gpus = [_file_figures(str(index), entry) for index, entry in enumerate(each)]
        except FileNotFoundError:
            gpus = [GpuMemory("0", 0, 0, self.DEFAULT_TOTAL)]
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            if not self._complained:
                logger.warning("VRAM file %s does not hold figures (%s); nothing is measured", self.path, exc)
                self._complained = True
            return None
        self._complained = False
        return Sample.of(gpus, "file", time.time())


def _file_figures(gpu: str, data: dict[str, Any]) -> GpuMemory:
    process = int(data.get("process_bytes", 0))
    device = int(data.get("device_bytes", process))
    total = int(data.get("total_bytes", FileSource.DEFAULT_TOTAL))
    if min(process, device) < 0 or total <= 0:
        raise ValueError("figures must not be negative")
    return GpuMemory(gpu, process, device, total)


class VramSampler:
    """Reads ``source`` every ``period`` seconds on its own thread and feeds ``policy``.
    Probes read ``latest`` and ``policy.last``; they never call NVML themselves."""

    def __init__(
        self,
        source: MemorySource,
        policy: VramPolicy | None,
        period: float = 1.0,
        on_sample: Callable[[Sample, Verdict | None], None] | None = None,
    ) -> None:
        self.source = source
        self.policy = policy
        self.period = period
        self.on_sample = on_sample
        self.latest: Sample | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zimage-vram", daemon=True)

    def start(self) -> VramSampler:
        if self.source.unavailable_reason is not None:
            logger.info("VRAM sampling is off: %s", self.source.unavailable_reason)
            return self
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def sample_once(self) -> None:
        sample = self.source.read()
        if sample is None:
            return
        self.latest = sample
        verdict = self.policy.observe(sample) if self.policy is not None else None
        if self.on_sample is not None:
            self.on_sample(sample, verdict)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception:
                logger.exception("VRAM sample failed")
            self._stop.wait(self.period)
