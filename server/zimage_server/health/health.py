"""What the three probes answer, and the separate health process that can answer them.

The routes in api.py and the health process give the same answers: both come from
``probe_responses``. With ``health_port`` set, a publisher task writes them to the health
board a few times a second (and a heartbeat on every tick), and ``HealthProcess`` runs
``health_server.py`` on that port.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import subprocess
import sys
from typing import Any

from zimage_server.core.processes import stop_process
from zimage_server.core.state import Phase, ServerState
from zimage_server.health.health_board import HealthBoard
from zimage_server.health.vram import VramSampler

logger = logging.getLogger(__name__)
PUBLISH_PERIOD_S = 0.1


def _body(ok: bool, state: ServerState, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {
        "status": "ok" if ok else "unavailable",
        "phase": state.phase.value,
        "detail": state.detail,
        **extra,
    }
    return (200 if ok else 503), body


def vram_report(sampler: VramSampler) -> dict[str, Any]:
    if sampler.source.unavailable_reason is not None:
        return {"available": False, "reason": sampler.source.unavailable_reason}
    report: dict[str, Any] = {"available": True}
    if sampler.latest is not None:
        latest = sampler.latest
        report.update(process_bytes=latest.process_bytes, device_bytes=latest.device_bytes)
        if len(latest.per_gpu()) > 1:
            report["gpus"] = [
                {"gpu": gpu.gpu, "process_bytes": gpu.process_bytes, "device_bytes": gpu.device_bytes}
                for gpu in latest.per_gpu()
            ]
    verdict = sampler.policy.last if sampler.policy is not None else None
    if sampler.policy is not None and verdict is not None:
        report.update(
            over_limit=verdict.over,
            scope=sampler.policy.scope,
            used_bytes=verdict.used_bytes,
            limit_bytes=verdict.limit_bytes,
            limit=str(sampler.policy.limit),
        )
        if verdict.gpu is not None:
            report["gpu"] = verdict.gpu
        if verdict.since is not None:
            report["since"] = datetime.datetime.fromtimestamp(verdict.since, datetime.UTC).isoformat()
    return report


def live(state: ServerState, engine_alive: bool, sampler: VramSampler) -> tuple[int, dict[str, Any]]:
    """Fails when the process can no longer serve: the model failed to load, the worker died,
    or GPU memory has stayed over the VRAM limit (the sampler's last verdict; no NVML call)."""
    vram = vram_report(sampler)
    ok = state.phase is not Phase.FAILED and engine_alive and not vram.get("over_limit", False)
    return _body(ok, state, engine_alive=engine_alive, vram=vram)


def ready(state: ServerState) -> tuple[int, dict[str, Any]]:
    """503 until the model is loaded and warmed up, and again while draining."""
    return _body(state.serving, state, draining=state.draining)


def startup(state: ServerState) -> tuple[int, dict[str, Any]]:
    """Passes once loading and warm-up are done; the kubelet holds other probes until then."""
    return _body(state.ready, state)


def probe_responses(
    state: ServerState, engine_alive: bool, sampler: VramSampler
) -> dict[str, tuple[int, dict[str, Any]]]:
    return {"live": live(state, engine_alive, sampler), "ready": ready(state), "startup": startup(state)}


class HealthProcess:
    """``health_server.py`` in its own process on ``host:port``, fed through a board."""

    def __init__(self, host: str, port: int, stall_s: float) -> None:
        self.host, self.port, self.stall_s = host, port, stall_s
        self.board = HealthBoard.create()
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> None:
        command = [sys.executable, "-m", "zimage_server.health.health_server", str(self.board.path)]
        command += [self.host, str(self.port), str(self.stall_s), str(os.getpid())]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # "listening", or nothing when it failed
        if line != "listening":
            self.proc.wait(timeout=timeout)
            self.stop()
            raise RuntimeError(
                f"the health server could not listen on {self.host}:{self.port} (see the log above)"
            )
        # Both processes have it mapped now: without a name, nothing is left behind however
        # the processes end (SIGKILL included).
        self.board.path.unlink(missing_ok=True)
        logger.info("health probes also on %s:%d (pid %d)", self.host, self.port, self.proc.pid)

    async def publish_forever(self, responses: Any) -> None:
        """``responses()`` -> probe_responses(...); written while the event loop runs."""
        while True:
            self.board.publish(responses())
            self.board.beat()
            await asyncio.sleep(PUBLISH_PERIOD_S)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.board.close(remove=True)
