"""Builds the FastAPI application and runs model loading and warm-up in the background."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from zimage_server import __version__
from zimage_server.core import background
from zimage_server.core.config import Settings
from zimage_server.core.errors import install_error_handlers
from zimage_server.core.keys import parse_keys
from zimage_server.core.metrics import Metrics
from zimage_server.core.state import Phase, ServerState, write_termination_log
from zimage_server.core.vram_limit import VramLimit
from zimage_server.engine.engine import Engine
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
from zimage_server.pipeline import compile_artifacts
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
            _load_and_warm_up(engine, state, metrics, settings, lambda: app.state.on_load_failure())
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


async def _load_and_warm_up(
    engine: Engine,
    state: ServerState,
    metrics: Metrics,
    settings: Settings,
    on_failure: Callable[[], None],
) -> None:
    """Load the model and warm it up on every worker (the phase's detail, which the probes
    answer to anyone, names no path and no error: the log has them); ``on_failure`` when it cannot be loaded
    (the command line ends the process then, so that the kubelet restarts it with backoff).

    The workers load and warm up one after the other: the first one loads the shared compile
    artifacts and compiles what they lack, into the process's compile caches, which the
    others then hit. The artifacts are saved once every worker has warmed up."""
    loop = asyncio.get_running_loop()
    runner = engine.lead
    where = {
        worker.label: f" on GPU {worker.label}" if len(engine.workers) > 1 else ""
        for worker in engine.workers
    }
    try:
        for worker in engine.workers:
            state.set(Phase.LOADING, f"loading the model{where[worker.label]}")
            await loop.run_in_executor(worker.thread, worker.runner.load)
        warmup_started = time.perf_counter()
        # What of the warm-up is torch.compile's (tracing, compiling or loading compiled
        # graphs) rather than running: per call in the log, in all as `warmup_compile`.
        compiling_before = compiling = compile_artifacts.compile_seconds()
        # Warm-up runs price nothing: they pay for one-time set-up and run at small sizes and
        # few steps, where fixed costs dominate (priced from them, Retry-After and the load
        # signal came out several times too high). The prior holds until the first real batch.
        for worker in engine.workers:
            for spec in worker.runner.warmup_specs():
                size, count = f"{spec.width}x{spec.height}", len(spec.prompts)
                state.set(Phase.WARMING, f"warming up at {size} (batch {count}){where[worker.label]}")
                result = await loop.run_in_executor(worker.thread, worker.runner.generate, spec)
                now = compile_artifacts.compile_seconds()
                of_which = ""
                if now is not None and compiling is not None:
                    of_which = f", of which compiling {now - compiling:.2f}s"
                compiling = now
                logger.info(
                    "warm-up at %s, batch %d%s took %.2fs%s",
                    size, count, where[worker.label], result.seconds, of_which,
                )  # fmt: skip
        runner.startup_seconds["warmup"] = time.perf_counter() - warmup_started
        if compiling_before is not None and compiling is not None and compiling > compiling_before:
            runner.startup_seconds["warmup_compile"] = compiling - compiling_before
            steps = compile_artifacts.compile_time_parts()
            logger.info(
                "torch.compile's longest steps so far (they nest): %s",
                ", ".join(f"{name} {seconds:.2f}s" for name, seconds in steps),
            )
        await loop.run_in_executor(engine.workers[0].thread, runner.save_artifacts)
        metrics.compile_artifacts.labels(runner.artifacts.state).set(1)
        for lookup, count in compile_artifacts.fx_graph_lookups().items():
            metrics.compile_fx_graphs.labels(lookup).set(count)
        for phase, seconds in runner.startup_seconds.items():
            metrics.startup_seconds.labels(phase).set(seconds)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.exception("the model could not be loaded")
        state.set(Phase.FAILED, "the model could not be loaded; the server log says why")
        write_termination_log(settings.termination_log_path, f"zimage: the model could not be loaded: {exc}")
        on_failure()
        return
    # Loading torch, transformers and diffusers leaves millions of long-lived objects; a full
    # garbage collection that walks them holds the GIL for tens of milliseconds. Freezing them
    # keeps such pauses out of request and probe latency.
    gc.collect()
    gc.freeze()
    state.set(Phase.READY, f"serving {settings.served_model_names[0]}")
    metrics.ready.set(1)
    logger.info("ready: serving %s", runner.source)
