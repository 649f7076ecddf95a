"""Start-up: load the model on every worker, warm it up, and say when it is ready.

Without compile (or with ``serve_while_compiling`` off) the warm-up comes before ready, on the
workers' own threads. With compile, a replica is ready as soon as its weights are on the GPU:
requests run uncompiled while a warm-up on a thread of its own, beside them, traces and
compiles the pipeline (and loads or saves the shared compile artifacts); then each worker's
gate opens and its requests run compiled. The load signal prices work uncompiled until then.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor

from zimage_server.core.config import Settings
from zimage_server.core.metrics import Metrics
from zimage_server.core.processes import process_age
from zimage_server.core.state import Phase, ServerState, write_termination_log
from zimage_server.engine.engine import Engine, Worker
from zimage_server.pipeline import compile_artifacts
from zimage_server.pipeline.runner import BatchResult, BatchSpec

logger = logging.getLogger(__name__)


async def load_and_warm_up(
    engine: Engine,
    state: ServerState,
    metrics: Metrics,
    settings: Settings,
    on_failure: Callable[[], None],
) -> None:
    """Load the model and warm it up on every worker (the phase's detail, which the probes
    answer to anyone, names no path and no error: the log has them); ``on_failure`` when it
    cannot be loaded (the command line ends the process then, so that the kubelet restarts it
    with backoff).

    The workers load and warm up one after the other: the first one loads the shared compile
    artifacts and compiles what they lack, into the process's compile caches, which the
    others then hit. The artifacts are saved once every worker has warmed up."""
    loop = asyncio.get_running_loop()
    beside = engine.compile_state == "compiling"
    where = _where(engine)
    try:
        for worker in engine.workers:
            state.set(Phase.LOADING, f"loading the model{where[worker.label]}")
            await loop.run_in_executor(worker.thread, worker.runner.load)
        if not beside:
            await _warm_up(engine, state, lambda worker: worker.thread, lambda worker: worker.runner.generate)
            await loop.run_in_executor(engine.workers[0].thread, engine.lead.save_artifacts)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.exception("the model could not be loaded")
        state.set(Phase.FAILED, "the model could not be loaded; the server log says why")
        write_termination_log(settings.termination_log_path, f"zimage: the model could not be loaded: {exc}")
        on_failure()
        return
    name = settings.served_model_names[0]
    detail = f"serving {name}, uncompiled while it compiles" if beside else f"serving {name}"
    _ready(engine, state, metrics, detail)
    if beside:
        await _compile_beside(engine, state, metrics, name)


def _where(engine: Engine) -> dict[str, str]:
    several = len(engine.workers) > 1
    return {worker.label: f" on GPU {worker.label}" if several else "" for worker in engine.workers}


def _ready(engine: Engine, state: ServerState, metrics: Metrics, detail: str) -> None:
    # Loading torch, transformers and diffusers leaves millions of long-lived objects; a full
    # garbage collection that walks them holds the GIL for tens of milliseconds. Freezing them
    # keeps such pauses out of request and probe latency.
    gc.collect()
    gc.freeze()
    _account(engine, "until_ready")
    _publish(engine, metrics)
    state.set(Phase.READY, detail)
    metrics.ready.set(1)
    logger.info("ready: %s (%s)", engine.lead.source, detail)


async def _compile_beside(engine: Engine, state: ServerState, metrics: Metrics, name: str) -> None:
    """The warm-up on threads of its own (one per worker, on its GPU) while the workers serve;
    each worker's gate opens once its warm-up is done. A failure leaves them uncompiled."""
    loop = asyncio.get_running_loop()
    threads = {
        worker.label: ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"zimage-compile{worker.label}",
            initializer=worker.runner.bind_thread,
        )
        for worker in engine.workers
    }
    try:
        await _warm_up(
            engine,
            None,
            lambda worker: threads[worker.label],
            lambda worker: worker.runner.warm_up,
            lambda worker: worker.runner.finish_warm_up(),
        )
        engine.compiled()
        _account(engine, "until_compiled")
        state.set(Phase.READY, f"serving {name}")
        logger.info(
            "the compiled pipeline serves from now on (%.1fs after the process started)",
            engine.lead.startup_seconds.get("until_compiled", 0.0),
        )
        await loop.run_in_executor(threads[engine.workers[0].label], engine.lead.save_artifacts)
        _publish(engine, metrics)
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("the compiled pipeline could not be built; requests go on uncompiled")
        for worker in engine.workers:
            if not worker.runner.gate.opened:
                worker.runner.warm_up_failed()
        engine.compile_failed()
        state.set(Phase.READY, f"serving {name}, uncompiled (its compile failed)")
    finally:
        for thread in threads.values():
            thread.shutdown(wait=False)


async def _warm_up(
    engine: Engine,
    state: ServerState | None,
    thread: Callable[[Worker], Executor],
    call: Callable[[Worker], Callable[[BatchSpec], BatchResult]],
    done: Callable[[Worker], None] | None = None,
) -> None:
    """Each worker's warm-up calls, worker after worker, on ``thread(worker)``; ``state``, when
    given, says which one runs (the warm-up before ready)."""
    loop = asyncio.get_running_loop()
    runner = engine.lead
    where = _where(engine)
    started = time.perf_counter()
    # What of the warm-up is torch.compile's (tracing, compiling or loading compiled graphs)
    # rather than running: per call in the log, in all as `warmup_compile`.
    compiling_before = compiling = compile_artifacts.compile_seconds()
    # Warm-up runs price nothing: they pay for one-time set-up and run at small sizes and few
    # steps, where fixed costs dominate (priced from them, Retry-After and the load signal came
    # out several times too high). The prior holds until the first real batch.
    for worker in engine.workers:
        for spec in worker.runner.warmup_specs():
            size, count = f"{spec.width}x{spec.height}", len(spec.prompts)
            if state is not None:
                state.set(Phase.WARMING, f"warming up at {size} (batch {count}){where[worker.label]}")
            result = await loop.run_in_executor(thread(worker), call(worker), spec)
            now = compile_artifacts.compile_seconds()
            of_which = ""
            if now is not None and compiling is not None:
                of_which = f", of which compiling {now - compiling:.2f}s"
            compiling = now
            logger.info(
                "warm-up at %s, batch %d%s took %.2fs%s",
                size, count, where[worker.label], result.seconds, of_which,
            )  # fmt: skip
        if done is not None:
            done(worker)
    runner.startup_seconds["warmup"] = time.perf_counter() - started
    if compiling_before is not None and compiling is not None and compiling > compiling_before:
        runner.startup_seconds["warmup_compile"] = compiling - compiling_before
        steps = compile_artifacts.compile_time_parts()
        logger.info(
            "torch.compile's longest steps so far (they nest): %s",
            ", ".join(f"{name} {seconds:.2f}s" for name, seconds in steps),
        )


def _account(engine: Engine, phase: str) -> None:
    """The process's age now, as start-up phase ``phase`` (Linux only)."""
    age = process_age()
    if age is not None:
        engine.lead.startup_seconds[phase] = age


def _publish(engine: Engine, metrics: Metrics) -> None:
    runner = engine.lead
    metrics.compile_artifacts.clear()
    metrics.compile_artifacts.labels(runner.artifacts.state).set(1)
    for lookup, count in compile_artifacts.fx_graph_lookups().items():
        metrics.compile_fx_graphs.labels(lookup).set(count)
    for phase, seconds in runner.startup_seconds.items():
        metrics.startup_seconds.labels(phase).set(seconds)
