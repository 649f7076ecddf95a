"""Builds the FastAPI application and runs model loading and warm-up in the background
(engine/startup.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from zimage_server import __version__
from zimage_server.core import background
from zimage_server.core.config import Settings
from zimage_server.core.errors import install_error_handlers
from zimage_server.core.keys import parse_keys
from zimage_server.core.metrics import Metrics
from zimage_server.core.state import ServerState
from zimage_server.core.vram_limit import VramLimit
from zimage_server.engine.engine import Engine
from zimage_server.engine.startup import load_and_warm_up
from zimage_server.health.health import HealthProcess, probe_responses
from zimage_server.health.vram import (
    FileSource,
    MemorySource,
    NvmlSource,
    Sample,
    Verdict,
    VramPolicy,
    VramSampler,
    release_torch_cache,
    write_termination_message,
)
from zimage_server.http import playground
from zimage_server.http.api import router
from zimage_server.http.auth import ApiKeyMiddleware, KeyRing
from zimage_server.http.http_server import MAX_HEAD_BYTES
from zimage_server.http.middleware import LastWordMiddleware, RequestLimitMiddleware, RequestMetricsMiddleware
from zimage_server.http.openapi import openapi_document
from zimage_server.http.service import ImageService
from zimage_server.pipeline.workers import make_runners

logger = logging.getLogger(__name__)


def create_app(settings: Settings, memory_source: MemorySource | None = None) -> FastAPI:
    """``memory_source``: where GPU memory is read (default: NVML)."""
    metrics = Metrics()
    state = ServerState()
    runners = make_runners(settings)
    runner = runners[0]
    if memory_source is None and settings.vram_source != "file":
        memory_source = NvmlSource(also=runner.follower_pids)
    sampler = make_vram_sampler(settings, metrics, memory_source)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        health_process = None
        if settings.health_port is not None:  # first: a port in use stops the start-up here
            health_process = HealthProcess(settings.host, settings.health_port, settings.health_stall_s)
            health_process.start()
        app.state.health_process = health_process
        engine = Engine(runners, settings, metrics)
        metrics.workers.set(len(engine.workers))
        encoder = background.pool(settings.encode_threads, "zimage-encode")
        app.state.service = ImageService(settings, engine, metrics, state, encoder)
        metrics.pending_gpu_seconds.set_function(engine.pending_gpu_seconds)
        engine.start()
        sampler.start()
        loader = asyncio.create_task(
            load_and_warm_up(engine, state, metrics, settings, lambda: app.state.on_load_failure())
        )
        publisher = None
        if health_process is not None:
            publisher = asyncio.create_task(
                health_process.publish_forever(lambda: probe_responses(state, engine.alive, sampler))
            )
        try:
            yield
        finally:
            if publisher is not None:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
            if health_process is not None:
                health_process.stop()
            sampler.stop()
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            await engine.stop()
            encoder.shutdown(wait=False, cancel_futures=True)
            gc.unfreeze()  # let interpreter shutdown collect as usual

    app = FastAPI(
        title="Z-Image server",
        version=__version__,
        description="Z-Image-Turbo text-to-image over an OpenAI-compatible images API.",
        lifespan=lifespan,
        # The interactive pages load scripts from third-party hosts onto the origin where the
        # playground keeps its API key; the document itself is served at /openapi.json.
        docs_url=None,
        redoc_url=None,
        # A redirect for a trailing slash is built from the Host header a client chose.
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.on_load_failure = lambda: None  # serve sets it to end the process
    app.state.abandoned = 0  # requests a drain that ran out of time answered 503 (drain.py)
    app.state.metrics = metrics
    app.state.server_state = state
    app.state.runner = runner
    app.state.runners = runners
    app.state.vram = sampler
    install_error_handlers(app)
    # The last added runs first: metrics see every answer, keys are checked before the body.
    app.add_middleware(
        RequestLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        max_head_bytes=MAX_HEAD_BYTES,
        route_max_bytes={"/v1/images/edits": settings.max_edit_body_bytes},
    )
    if settings.authenticated:
        app.add_middleware(ApiKeyMiddleware, ring=key_ring(settings))
    # A request cancelled at shutdown gets its JSON 503 there, and the metrics count that 503.
    app.add_middleware(LastWordMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.include_router(router)
    if settings.playground:
        app.include_router(playground.router)
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    return app


def key_ring(settings: Settings) -> KeyRing:
    if settings.api_keys_file is not None:
        return KeyRing.from_file(settings.api_keys_file)
    assert settings.api_keys is not None
    return KeyRing(parse_keys(settings.api_keys.get_secret_value()))


def make_vram_sampler(settings: Settings, metrics: Metrics, source: MemorySource | None) -> VramSampler:
    if source is None:
        source = FileSource(settings.vram_source_file) if settings.vram_source == "file" else NvmlSource()
    policy = None
    if settings.vram_limit is not None:
        scope = settings.vram_scope

        def over(verdict: Verdict) -> None:
            logger.error(
                "VRAM over the limit (%s): %d of %d bytes; liveness now fails",
                scope,
                verdict.used_bytes,
                verdict.limit_bytes,
            )
            write_termination_message(settings.termination_log_path, verdict, scope)

        policy = VramPolicy(
            VramLimit.parse(settings.vram_limit),
            scope,
            consecutive=settings.vram_consecutive,
            recover=settings.vram_recover,
            hysteresis=settings.vram_hysteresis,
            release_cache=release_torch_cache,
            remeasure=source.read,
            on_over=over,
        )

    def record(sample: Sample, verdict: Verdict | None) -> None:
        metrics.vram_samples.inc()
        for gpu in sample.per_gpu():
            metrics.vram_used.labels("process", gpu.gpu).set(gpu.process_bytes)
            metrics.vram_used.labels("device", gpu.gpu).set(gpu.device_bytes)
        if verdict is not None:
            metrics.vram_limit.set(verdict.limit_bytes)
            metrics.vram_over.set(1 if verdict.over else 0)

    return VramSampler(source, policy, settings.vram_sample_period_s, on_sample=record)
