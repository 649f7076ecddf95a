"""Prometheus metrics. Each server owns its registry, so several can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "zimage_requests",
            "HTTP requests answered, by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "zimage_request_duration_seconds",
            "Time from request arrival to response, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "zimage_queue_wait_seconds",
            "Time a request waited before its first image reached the GPU",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "zimage_batch_duration_seconds",
            "Wall time of one pipeline call (text encoding, denoising and VAE decode)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "zimage_step_duration_seconds", "Time of one denoising step", buckets=_STEP_BUCKETS, registry=r
        )
        self.encode_seconds = Histogram(
            "zimage_encode_duration_seconds",
            "Time to encode one image, by format",
            ["format"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.partial_image_seconds = Histogram(
            "zimage_partial_image_duration_seconds",
            "GPU time of one streamed partial image (clean estimate, VAE decode); its batch waits for it",
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "zimage_batch_size", "Images per forward batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.images = Counter("zimage_images_generated", "Images generated", registry=r)
        self.gpu_images = Counter(
            "zimage_gpu_images_generated", "Images generated, by the worker's GPU", ["gpu"], registry=r
        )
        self.adapter_requests = Counter(
            "zimage_adapter_requests",
            "Requests admitted that use each LoRA adapter",
            ["adapter"],
            registry=r,
        )
        self.adapter_images = Counter(
            "zimage_adapter_images_generated",
            "Images generated with each LoRA adapter",
            ["adapter"],
            registry=r,
        )
        self.gpu_busy_seconds = Counter(
            "zimage_gpu_busy_seconds",
            "Seconds the worker on each GPU spent running batches (its rate: that GPU's utilisation)",
            ["gpu"],
            registry=r,
        )
        self.worker_busy = Gauge(
            "zimage_worker_busy", "1 while the worker on this GPU runs a batch", ["gpu"], registry=r
        )
        self.workers = Gauge("zimage_workers", "Pipeline workers (GPUs) behind the queue", registry=r)
        self.queue_depth = Gauge("zimage_queue_depth", "Requests waiting for the GPU", registry=r)
        self.queue_images = Gauge("zimage_queue_images", "Images waiting for the GPU", registry=r)
        self.in_flight = Gauge(
            "zimage_in_flight_requests", "Requests with images on the GPU right now", registry=r
        )
        self.cancelled = Counter(
            "zimage_requests_cancelled",
            "Requests dropped before their work reached the GPU, by reason",
            ["reason"],
            registry=r,
        )
        self.pending_gpu_seconds = Gauge(
            "zimage_pending_gpu_seconds",
            "Expected GPU time of the queued and running work, priced from measured step times",
            registry=r,
        )
        self.ready = Gauge(
            "zimage_model_ready",
            "1 once the model is loaded and warmed up (it stays 1 while draining)",
            registry=r,
        )
        self.startup_seconds = Gauge(
            "zimage_startup_seconds",
            "Seconds each start-up phase took: start (process start to loading: interpreter, "
            "imports, the HTTP server, CUDA's initialisation) and its parts imports and cuda_init, "
            "load (weights to the device), tune (attention timing, fp8; artifacts_load included), "
            "warmup (the warm-up generations, compiles included) and its part warmup_compile, "
            "artifacts_load and artifacts_save (the shared compile artifacts), weights_prefetch "
            "(reading the weight files ahead, beside start and load); until_ready and until_compiled: "
            "the process's age when it became ready and when the compiled pipeline took over",
            ["phase"],
            registry=r,
        )
        self.compile_artifacts = Gauge(
            "zimage_compile_artifacts",
            "1 for what this replica did with the shared compile artifacts: off, absent (none yet), "
            "loaded, ignored (partial, corrupt or unreadable), saved, exists (saved by another)",
            ["state"],
            registry=r,
        )
        self.compile_state = Gauge(
            "zimage_compile_state",
            "1 for where the compiled pipeline stands: off (compile off), compiling (built beside the "
            "requests, which run uncompiled and slower meanwhile), compiled (requests run it), failed "
            "(its build failed; requests run uncompiled, the log says why)",
            ["state"],
            registry=r,
        )
        self.compile_fx_graphs = Gauge(
            "zimage_compile_fx_graphs",
            "Graphs Inductor looked up in its cache during start-up: hit (loaded compiled), miss (compiled)",
            ["result"],
            registry=r,
        )
        self.connections_cut = Counter(
            "zimage_connections_cut",
            "Connections the serving port closed on its own, by reason: read_timeout (the request did "
            "not arrive in time), send_timeout (the client did not take its answer), evicted (an idle "
            "one closed to let a new one in past max_connections), over_capacity (a new one refused: "
            "every connection busy)",
            ["reason"],
            registry=r,
        )
        for reason in ("read_timeout", "send_timeout", "evicted", "over_capacity"):
            self.connections_cut.labels(reason)
        self.draining = Gauge("zimage_draining", "1 while finishing accepted work before exit", registry=r)
        self.vram_used = Gauge(
            "zimage_vram_used_bytes",
            "GPU memory in use on each of this process's GPUs, by scope (process: this process's "
            "share; device: all of it)",
            ["scope", "gpu"],
            registry=r,
        )
        self.vram_limit = Gauge(
            "zimage_vram_limit_bytes",
            "The VRAM limit in bytes on the GPU nearest to it (0: none)",
            registry=r,
        )
        self.vram_over = Gauge(
            "zimage_vram_over_limit",
            "1 while liveness fails for VRAM (any one GPU over its limit)",
            registry=r,
        )
        self.vram_samples = Counter("zimage_vram_samples", "GPU memory samples taken", registry=r)

    def connection_cut(self, reason: str) -> None:
        self.connections_cut.labels(reason).inc()
