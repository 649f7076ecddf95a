"""The request engine: a queue of jobs feeding the pipeline workers (one per GPU), with batching
of compatible work.

Each job asks for ``n`` images of one size and step count. A free worker takes the oldest job,
fills a batch of up to ``max_batch_size`` images from it and from any later job with the same
size and steps, waits at most ``batch_wait_ms`` for the batch to fill, and runs the pipeline
once for the whole batch on its own thread and GPU. One free worker at a time forms a batch;
the next free one forms the next, so batches go to the first free worker. Right after a batch
it waits a little longer, until ``batch_linger_ms`` after that batch ended (at most
``LINGER_SHARE`` of its run time) or until as many requests have arrived as the batch
answered: clients that send their next request as soon as they have their images then join
one batch instead of settling into half batches of their own, and a lone client never waits
for company that is not coming. A job that is cancelled (timeout, client gone) before its
images are taken costs no GPU time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from PIL import Image

from zimage_server.core.adapters import Selection
from zimage_server.core.config import Settings
from zimage_server.core.errors import APIError, draining_error
from zimage_server.core.metrics import Metrics
from zimage_server.engine.cost_model import UNCOMPILED_SLOWDOWN, CostModel
from zimage_server.pipeline.runner import (
    BatchResult,
    BatchSpec,
    EditBatch,
    PipelineRunner,
    denoising_steps,
    prompt_tokens,
)

logger = logging.getLogger(__name__)


class BatchKey(NamedTuple):
    """What the jobs of one batch share."""

    width: int
    height: int
    steps: int
    adapters: Selection  # LoRA adapters and their scales
    edit: tuple[str, float] | None  # an edit's kind and strength; None: text to image

    @property
    def work_steps(self) -> int:
        """The denoising steps the batch runs (an edit runs the last ``strength`` of them)."""
        return self.steps if self.edit is None else denoising_steps(self.steps, self.edit[1])


@dataclass(frozen=True)
class EditInput:
    """An edit request's start: the image at the request's size, and to inpaint its mask
    (mode L, 255 where the image is repainted)."""

    kind: str
    strength: float
    image: Image.Image
    mask: Image.Image | None = None


# The longest wait for a fuller batch after a batch, as a share of that batch's run time: what
# a batch that does not fill loses at most.
LINGER_SHARE = 0.05


@dataclass(eq=False)
class Job:
    prompt: str
    width: int
    height: int
    steps: int
    seeds: list[int]
    arrived: float = field(default_factory=time.monotonic)
    future: asyncio.Future[list[Image.Image]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    images: dict[int, Image.Image] = field(default_factory=dict)
    taken: int = 0
    cancelled: bool = False
    # A streamed request: partial images per image, and where its events go as the GPU works
    # (("step", done, steps), ("partial", image index, partial index, image), ("image", index,
    # image)). The future still says when all its images are done, or why not.
    partial_images: int = 0
    events: asyncio.Queue[tuple[Any, ...]] | None = None
    # LoRA adapters and their scales, by name: only jobs with the same ones share a batch.
    adapters: Selection = ()
    # An edit's image (and mask): batched only with edits of the same kind and strength.
    edit: EditInput | None = None

    def __post_init__(self) -> None:
        # Mark a failure as seen even when no handler is left to read it (its client went, or
        # the shutdown cancelled it): asyncio would log "exception was never retrieved".
        self.future.add_done_callback(_observe)

    @property
    def key(self) -> BatchKey:
        edit = None if self.edit is None else (self.edit.kind, self.edit.strength)
        return BatchKey(self.width, self.height, self.steps, self.adapters, edit)

    @property
    def remaining(self) -> int:
        return len(self.seeds) - self.taken


def _observe(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(eq=False)
class Worker:
    """One pipeline on one GPU, with the thread that drives it and the batch it runs now."""

    runner: PipelineRunner
    label: str  # the GPU's CUDA index ("cpu0", "cpu1"... for workers on the CPU)
    thread: ThreadPoolExecutor
    jobs: int = 0  # requests with images in its batch now
    cost: float = 0.0  # expected GPU-seconds of that batch
    since: float = 0.0

    @classmethod
    def of(cls, runner: PipelineRunner, index: int) -> Worker:
        device = runner.device
        label = str(device.index or 0) if device.type == "cuda" else f"{device.type}{index}"
        thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"zimage-gpu{label}", initializer=runner.bind_thread
        )
        return cls(runner, label, thread)

    def left(self, now: float) -> float:
        """Expected seconds until its batch ends (0 when idle)."""
        return max(0.0, self.cost - (now - self.since)) if self.jobs else 0.0


class Engine:
    def __init__(self, runners: list[PipelineRunner], settings: Settings, metrics: Metrics) -> None:
        # The first worker's runner: it loads and saves the shared compile artifacts, and its
        # tokenizer checks prompts at admission (every worker's is the same).
        self.lead = runners[0]
        self.workers = [Worker.of(runner, index) for index, runner in enumerate(runners)]
        self.settings = settings
        self.metrics = metrics
        self._jobs: deque[Job] = deque()
        self._live: set[Job] = set()  # submitted and not yet answered, queued or on a GPU
        self._arrived = asyncio.Event()
        self._forming = asyncio.Lock()  # one free worker at a time takes from the queue
        self._tasks: list[asyncio.Task[None]] = []
        # Where compile is on and requests are served while it builds, work is priced uncompiled
        # until every worker runs the compiled pipeline (``compiled``).
        early = any(runner.serves_while_compiling for runner in runners)
        self.cost = CostModel(slowdown=UNCOMPILED_SLOWDOWN if early else 1.0)
        compiles = self.lead.compile and bool(settings.compile_parts)
        self.compile_state = "compiling" if early else "compiled" if compiles else "off"
        self._progress = asyncio.Event()  # set whenever work finishes or leaves the queue
        # After a batch: until when the next one waits for the requests it answered to come back,
        # how many requests it answered, and how many have arrived since.
        self._linger_until = 0.0
        self._answered = 0
        self._arrived_since = 0

    # -- lifecycle -------------------------------------------------------------------------

    def check_prompt(self, prompt: str) -> None:
        """Raise ``ValueError`` when the model's tokenizer cannot encode ``prompt``."""
        self.lead.check_prompt(prompt)

    def check_adapters(self, selection: Selection) -> None:
        """Raise ``ValueError`` naming why ``selection`` cannot run here (unknown, failed to
        load, too many, past the rank ceiling)."""
        self.lead.adapters.check(selection)

    @property
    def adapters(self) -> Any:
        """The LoRA adapters every worker loaded (the lead runner's, the same on each)."""
        return self.lead.adapters

    def prompt_tokens(self, prompt: str) -> int:
        """The tokens ``prompt`` takes in the text encoder's window (0 before the model loads)."""
        tokenizer = self.lead.admission_tokenizer
        return prompt_tokens(tokenizer, [prompt])[0] if tokenizer is not None else 0

    @property
    def artifacts(self) -> Any:
        """What this replica did with the shared compile artifacts (the lead runner's record)."""
        return self.lead.artifacts

    def compiled(self) -> None:
        """Every worker runs the compiled pipeline now (their gates are open)."""
        if self.compile_state == "compiling":
            self.compile_state = "compiled"
            self.cost.compiled()
        self._update_compile_state()

    def compile_failed(self) -> None:
        """The compiled pipeline could not be built: the workers go on uncompiled."""
        self.compile_state = "failed"
        self._update_compile_state()

    def _update_compile_state(self) -> None:
        for state in ("off", "compiling", "compiled", "failed"):
            self.metrics.compile_state.labels(state).set(1 if state == self.compile_state else 0)

    def start(self) -> None:
        self._update_compile_state()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(worker), name=f"zimage-engine-{worker.label}")
            for worker in self.workers
        ]

    @property
    def alive(self) -> bool:
        return (
            bool(self._tasks)
            and not any(task.done() for task in self._tasks)
            and all(worker.runner.alive for worker in self.workers)
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._jobs:
            job = self._jobs.popleft()
            if not job.future.done():
                job.future.set_exception(draining_error("stopped before this request was answered"))
        self._update_gauges()
        for worker in self.workers:
            worker.thread.shutdown(wait=False, cancel_futures=True)
            worker.runner.stop()

    # -- submission ------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self._jobs and self.in_flight == 0

    async def wait_idle(self) -> None:
        """Return once no work is queued or running."""
        while not self.idle:
            self._progress.clear()
            await self._progress.wait()

    @property
    def waiting(self) -> int:
        return sum(1 for job in self._jobs if job.taken == 0)

    def position(self, job: Job) -> int:
        """``job``'s place among the requests waiting for the GPU (1: next), 0 once its images
        are being made."""
        if job.taken:
            return 0
        place = 1
        for other in self._jobs:
            if other is job:
                return place
            if other.taken == 0:
                place += 1
        return 0

    @property
    def queued_images(self) -> int:
        return sum(job.remaining for job in self._jobs)

    @property
    def in_flight(self) -> int:
        """Requests with images on a GPU now, over all workers (a request split over two
        workers' batches counts twice)."""
        return sum(worker.jobs for worker in self.workers)

    def pending_gpu_seconds(self) -> float:
        """Expected GPU time of everything queued or running on every worker, priced from
        measured batches."""
        queued = sum(
            self.cost.cost(job.width, job.height, job.key.work_steps, job.remaining) for job in self._jobs
        )
        return queued + sum(worker.cost for worker in self.workers if worker.jobs)

    def retry_after(self) -> int:
        """Seconds until a place in the full queue likely frees: when the first worker to end
        its batch takes the next one from the queue."""
        now = time.monotonic()
        busy = [worker.left(now) for worker in self.workers if worker.jobs]
        if len(busy) == len(self.workers):
            left = min(busy)
        else:
            left = self.pending_gpu_seconds() / max(
                1, math.ceil(self.queued_images / self.settings.max_batch_size)
            )
        return max(1, math.ceil(left))

    def submit(self, job: Job) -> None:
        if self.waiting >= self.settings.max_queue:
            self.metrics.cancelled.labels("queue_full").inc()
            raise APIError(
                429,
                f"the queue is full ({self.settings.max_queue} requests waiting); retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after())},
            )
        self._jobs.append(job)
        self._live.add(job)
        job.future.add_done_callback(lambda _: self._live.discard(job))
        self._arrived_since += 1
        self._update_gauges()
        self._arrived.set()

    def cancel(self, job: Job, reason: str) -> None:
        """Drop what is left of ``job``; images already on the GPU finish but are thrown away."""
        if job.cancelled or job.future.done():
            return
        job.cancelled = True
        if job.taken == 0:
            self.metrics.cancelled.labels(reason).inc()
            logger.info("dropped a queued request before it reached the GPU (%s)", reason)
        with contextlib.suppress(ValueError):
            self._jobs.remove(job)
        self._update_gauges()
        self._progress.set()

    def abandon(self, error: Callable[[], APIError]) -> int:
        """Answer every request not yet answered with ``error()``, queued or on a GPU (whose
        images are thrown away when they come); how many there were."""
        jobs = [job for job in self._live if not job.future.done()]
        for job in jobs:
            self.cancel(job, "abandoned")
            job.future.set_exception(error())
        return len(jobs)

    # -- worker ----------------------------------------------------------------------------

    async def _run(self, worker: Worker) -> None:
        while True:
            try:
                await self._run_once(worker)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one batch
                logger.exception("engine iteration failed")

    async def _next_batch(self) -> tuple[BatchKey, list[tuple[Job, int]]]:
        async with self._forming:
            while not self._jobs:
                self._arrived.clear()
                await self._arrived.wait()
            key = self._jobs[0].key
            await self._wait_to_fill(key)
            return key, self._take(key)

    async def _run_once(self, worker: Worker) -> None:
        key, batch = await self._next_batch()
        if not batch:
            return
        jobs = list(dict.fromkeys(job for job, _ in batch))
        worker.jobs = len(jobs)
        worker.cost = self.cost.cost(key.width, key.height, key.work_steps, len(batch))
        worker.since = time.monotonic()
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.worker_busy.labels(worker.label).set(1)
        self._update_gauges()
        spec = _spec(key, batch)
        compiled = worker.runner.gate.opened
        try:
            result = await self._generate(worker, spec, batch)
        except Exception as exc:
            if len(jobs) == 1:
                logger.exception("a batch of %d images failed", len(batch))
                self._fail(jobs[0], exc)
            else:  # one request's input may have failed them all: find it, spare the others
                logger.warning("a batch of %d requests failed (%s); running each alone", len(jobs), exc)
                for job in jobs:
                    await self._run_alone(worker, job, [(j, i) for j, i in batch if j is job], key)
        else:
            # A batch that ran partly uncompiled, or not as the cost model now prices, is not
            # measured (its time would be taken for the other kind).
            priced = compiled == worker.runner.gate.opened == (self.cost.slowdown == 1.0)
            self._finish(worker, result, batch, key, priced)
            linger = min(self.settings.batch_linger_ms / 1000.0, LINGER_SHARE * result.seconds)
            self._linger_until = time.monotonic() + linger
            self._answered = sum(1 for job in jobs if job.future.done())
            self._arrived_since = 0
        finally:
            worker.jobs = 0
            worker.cost = 0.0
            self.metrics.in_flight.set(self.in_flight)
            self.metrics.worker_busy.labels(worker.label).set(0)
            self._progress.set()

    def _finish(
        self,
        worker: Worker,
        result: BatchResult,
        batch: list[tuple[Job, int]],
        key: BatchKey,
        priced: bool = True,
    ) -> None:
        self._record(worker, result, len(batch), key.adapters)
        if priced:
            self.cost.observe(key.width, key.height, key.work_steps, len(batch), result.seconds)
        for (job, index), image in zip(batch, result.images, strict=True):
            self._deliver(job, index, image)

    async def _run_alone(self, worker: Worker, job: Job, part: list[tuple[Job, int]], key: BatchKey) -> None:
        """Run ``part`` (images of ``job`` from a failed batch) as a batch of its own."""
        if job.cancelled or job.future.done():
            return
        spec = _spec(key, part)
        try:
            result = await self._generate(worker, spec, part)
        except Exception as exc:
            logger.exception("a request's %d images failed on their own", len(part))
            self._fail(job, exc)
        else:
            self._finish(worker, result, part, key)

    async def _generate(self, worker: Worker, spec: BatchSpec, batch: list[tuple[Job, int]]) -> BatchResult:
        loop = asyncio.get_running_loop()
        observer = _BatchObserver(loop, batch, self.metrics) if any(job.events for job, _ in batch) else None
        return await loop.run_in_executor(worker.thread, worker.runner.generate, spec, observer)

    async def _wait_to_fill(self, key: BatchKey) -> None:
        waited = time.monotonic() + self.settings.batch_wait_ms / 1000.0
        while self._fillable(key) < self.settings.max_batch_size:
            deadline = waited
            if self._arrived_since < self._answered:  # those just answered may be coming back
                deadline = max(deadline, self._linger_until)
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

    def _fillable(self, key: BatchKey) -> int:
        return sum(job.remaining for job in self._jobs if job.key == key)

    def _take(self, key: BatchKey) -> list[tuple[Job, int]]:
        room = self.settings.max_batch_size
        now = time.monotonic()
        batch: list[tuple[Job, int]] = []
        for job in list(self._jobs):
            if room == 0:
                break
            if job.key != key:
                continue
            if job.taken == 0:
                self.metrics.queue_wait_seconds.observe(now - job.arrived)
            count = min(room, job.remaining)
            batch.extend((job, job.taken + i) for i in range(count))
            job.taken += count
            room -= count
            if job.remaining == 0:
                self._jobs.remove(job)
        return batch

    def _record(self, worker: Worker, result: BatchResult, size: int, adapters: Selection) -> None:
        for name, _ in adapters:
            self.metrics.adapter_images.labels(name).inc(size)
        self.metrics.batch_seconds.observe(result.seconds)
        self.metrics.batch_size.observe(size)
        self.metrics.images.inc(size)
        self.metrics.gpu_images.labels(worker.label).inc(size)
        self.metrics.gpu_busy_seconds.labels(worker.label).inc(result.seconds)
        for seconds in result.step_seconds:
            self.metrics.step_seconds.observe(seconds)

    def _deliver(self, job: Job, index: int, image: Image.Image) -> None:
        if job.cancelled or job.future.done():
            return
        job.images[index] = image
        if job.events is not None:
            job.events.put_nowait(("image", index, image))
        if len(job.images) == len(job.seeds):
            job.future.set_result([job.images[i] for i in range(len(job.seeds))])

    def _fail(self, job: Job, exc: Exception) -> None:
        with contextlib.suppress(ValueError):
            self._jobs.remove(job)
        if not job.cancelled and not job.future.done():
            job.future.set_exception(exc)

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.queue_images.set(self.queued_images)


def _spec(key: BatchKey, batch: list[tuple[Job, int]]) -> BatchSpec:
    """The pipeline's batch for ``batch``'s images (all of one ``key``)."""
    edit = None
    if key.edit is not None:
        inputs = [job.edit for job, _ in batch if job.edit is not None]
        edit = EditBatch(
            key.edit[0],
            key.edit[1],
            [one.image for one in inputs],
            [one.mask for one in inputs if one.mask is not None],
        )
    return BatchSpec(
        prompts=[job.prompt for job, _ in batch],
        seeds=[job.seeds[i] for job, i in batch],
        width=key.width,
        height=key.height,
        steps=key.steps,
        partials=[job.partial_images for job, _ in batch],
        adapters=key.adapters,
        edit=edit,
    )


class _BatchObserver:
    """Hands a batch's steps and partial images to its streamed jobs, from the worker thread."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, batch: list[tuple[Job, int]], metrics: Metrics
    ) -> None:
        self.loop = loop
        self.batch = batch
        self.metrics = metrics
        self.jobs = [job for job in dict.fromkeys(job for job, _ in batch) if job.events is not None]

    def _send(self, job: Job, event: tuple[Any, ...]) -> None:
        if job.events is not None and not job.cancelled:
            self.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def step(self, done: int, steps: int) -> None:
        for job in self.jobs:
            self._send(job, ("step", done, steps))

    def partial(self, item: int, index: int, image: Image.Image, seconds: float) -> None:
        self.metrics.partial_image_seconds.observe(seconds)
        job, image_index = self.batch[item]
        self._send(job, ("partial", image_index, index, image))
