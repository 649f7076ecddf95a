"""The data plane: check a request against the server's limits, queue it, wait, encode."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from PIL import Image

from zimage_server.core.adapters import Selection, check_scale
from zimage_server.core.config import Settings
from zimage_server.core.encoding import encode_image
from zimage_server.core.errors import APIError, bad_request, draining_error
from zimage_server.core.metrics import Metrics
from zimage_server.core.state import Phase, ServerState
from zimage_server.engine.engine import EditInput, Engine, Job
from zimage_server.http.protocol import RANDOM_SEED_LIMIT, ImageGenerationRequest, OutputFormat


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    width: int
    height: int
    steps: int
    seeds: list[int]
    output_format: OutputFormat
    quality: int
    stream: bool = False
    partial_images: int = 0
    progress: bool = False
    adapters: Selection = ()
    edit: EditInput | None = None  # POST /v1/images/edits: what the images start from

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


class ClientGoneError(APIError):
    def __init__(self) -> None:
        # 499: nginx's "client closed request"; nobody reads it, the metrics do.
        super().__init__(499, "the client closed the connection", code="client_closed_request")


class ImageService:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        metrics: Metrics,
        state: ServerState,
        encoder: ThreadPoolExecutor,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.state = state
        self.encoder = encoder

    @property
    def model_name(self) -> str:
        return self.settings.served_model_names[0]

    def params(self, req: ImageGenerationRequest) -> GenerationParams:
        """Check ``req`` against this server's limits; raise a 4xx ``APIError`` naming the fix."""
        s = self.settings
        if (
            req.model is not None
            and req.model not in s.served_model_names
            and req.model not in self.adapter_names
        ):
            listed = f", an adapter ({', '.join(sorted(self.adapter_names))})" if self.adapter_names else ""
            raise APIError(
                404,
                f"model {req.model!r} is not served here; use {self.model_name!r}{listed} "
                "or leave 'model' out",
                param="model",
                code="model_not_found",
            )
        adapters = self.adapters(req)
        if req.response_format == "url":
            raise bad_request(
                "response_format 'url' is not supported: this server keeps no images to link to; "
                "use 'b64_json' (the default), or POST /generate for the raw image bytes",
                param="response_format",
                code="unsupported_value",
            )
        if len(req.prompt) > s.max_prompt_chars:
            raise bad_request(
                f"the prompt is {len(req.prompt)} characters long; the limit is {s.max_prompt_chars}",
                param="prompt",
            )
        try:
            self.engine.check_prompt(req.prompt)
        except ValueError as exc:
            raise bad_request(str(exc), param="prompt") from None
        if not 1 <= req.n <= s.max_n:
            raise bad_request(f"'n' must be between 1 and {s.max_n}, got {req.n}", param="n")
        size = s.default_size if req.size in (None, "auto") else req.size
        try:
            width, height = s.check_size(size)
        except ValueError as exc:
            raise bad_request(str(exc), param="size") from None
        steps = s.default_steps if req.num_inference_steps is None else req.num_inference_steps
        if not 1 <= steps <= s.max_steps:
            raise bad_request(
                f"'num_inference_steps' must be between 1 and {s.max_steps}, got {steps} "
                f"(Z-Image-Turbo is made for {s.default_steps})",
                param="num_inference_steps",
            )
        if not req.stream:
            for name in ("partial_images", "stream_progress"):
                if getattr(req, name) is not None:
                    raise bad_request(f"'{name}' needs \"stream\": true", param=name)
        if req.background not in (None, "auto", "opaque"):
            raise bad_request(
                f"background {req.background!r} is not supported: this model draws opaque images; "
                "send 'opaque' or 'auto', or leave it out",
                param="background",
                code="unsupported_value",
            )
        if req.moderation not in (None, "low"):
            raise bad_request(
                f"moderation {req.moderation!r} is not supported: this server does no content "
                "filtering; send 'low', or leave it out",
                param="moderation",
                code="unsupported_value",
            )
        seed = secrets.randbelow(RANDOM_SEED_LIMIT - req.n) if req.seed is None else req.seed
        quality = s.default_quality if req.output_compression is None else max(1, req.output_compression)
        return GenerationParams(
            prompt=req.prompt,
            width=width,
            height=height,
            steps=steps,
            seeds=[(seed + i) % 2**64 for i in range(req.n)],  # what the generators take
            output_format=req.output_format or "png",
            quality=quality,
            stream=bool(req.stream),
            partial_images=req.partial_images or 0,
            progress=bool(req.stream_progress),
            adapters=adapters,
        )

    @property
    def adapter_names(self) -> set[str]:
        return {adapter.name for adapter in self.settings.loras}

    def adapters(self, req: ImageGenerationRequest) -> Selection:
        """The request's adapters (its ``lora`` list, and its ``model`` where that names one),
        each with its scale, by name; a 400 naming the one that cannot be."""
        defaults = {adapter.name: adapter.scale for adapter in self.settings.loras}
        chosen: dict[str, float] = {}
        if req.model in defaults:
            chosen[req.model] = defaults[req.model]
        for index, choice in enumerate(req.lora or []):
            param = f"lora[{index}]"
            if choice.name in chosen:
                raise bad_request(f"adapter {choice.name!r} is named twice", param=param)
            if choice.name not in defaults:
                known = ", ".join(sorted(defaults)) or "this server has none"
                raise bad_request(
                    f"adapter {choice.name!r} is not served here; the adapters are: {known}",
                    param=f"{param}.name",
                    code="adapter_not_found",
                )
            try:
                scale = defaults[choice.name] if choice.scale is None else check_scale(choice.scale)
            except ValueError as exc:
                raise bad_request(f"adapter {choice.name!r}: {exc}", param=f"{param}.scale") from None
            chosen[choice.name] = scale
        selection = tuple(sorted(chosen.items()))
        try:
            self.engine.check_adapters(selection)
        except ValueError as exc:
            raise bad_request(str(exc), param="lora", code="adapter_unavailable") from None
        return selection

    async def generate(self, params: GenerationParams, request: Request) -> list[Image.Image]:
        """Queue the work and wait for it, giving up at the timeout or when the client leaves."""
        job = self.admit(params)
        timeout = self.settings.request_timeout_s - (time.monotonic() - job.arrived)
        gone = asyncio.create_task(_client_gone(request))
        waiters: set[asyncio.Future[Any]] = {job.future, gone}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if job.future.done():
            return job.future.result()
        if gone.done() and not gone.cancelled():
            self.engine.cancel(job, "disconnect")
            raise ClientGoneError()
        self.engine.cancel(job, "timeout")
        raise self.timeout_error()

    def timeout_error(self) -> APIError:
        return APIError(
            504,
            f"the request did not finish within {self.settings.request_timeout_s:g}s "
            f"(server busy: {self.engine.waiting} requests waiting); retry later or ask for fewer images",
            type="server_error",
            code="timeout",
        )

    def admit(self, params: GenerationParams) -> Job:
        """Queue the work, or raise the 503 or 429 that says why not."""
        if self.state.draining:
            raise draining_error("takes no new work")
        if self.state.phase is Phase.FAILED:
            raise APIError(
                503,
                "this replica could not load the model and cannot serve; it is restarting",
                type="server_error",
                code="model_failed",
                headers={"Retry-After": "30"},
            )
        if not self.state.ready:  # the phase only: the detail names server paths
            raise APIError(
                503,
                f"the model is not ready yet ({self.state.phase.value}); retry shortly",
                type="server_error",
                code="model_not_ready",
                headers={"Retry-After": "5"},
            )
        job = Job(
            params.prompt,
            params.width,
            params.height,
            params.steps,
            params.seeds,
            partial_images=params.partial_images if params.stream else 0,
            events=asyncio.Queue() if params.stream else None,
            adapters=params.adapters,
            edit=params.edit,
        )
        self.engine.submit(job)
        for name, _ in params.adapters:
            self.metrics.adapter_requests.labels(name).inc()
        return job

    async def encode(self, images: list[Image.Image], params: GenerationParams) -> list[bytes]:
        loop = asyncio.get_running_loop()
        return list(
            await asyncio.gather(
                *(loop.run_in_executor(self.encoder, self.encode_one, image, params) for image in images)
            )
        )

    async def encode_response(self, images: list[Image.Image], params: GenerationParams) -> bytes:
        """The whole JSON body of an images response, built on the encoder threads: base64 and
        JSON of multi-megabyte images would otherwise hold the event loop (and the probes)."""
        encoded = await self.encode(images, params)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.encoder, _images_json, encoded, params)

    def encode_one(self, image: Image.Image, params: GenerationParams) -> bytes:
        started = time.perf_counter()
        data = encode_image(
            image,
            params.output_format,
            params.quality,
            self.settings.png_compress_level,
            self.settings.png_encoder,
        )
        self.metrics.encode_seconds.labels(params.output_format).observe(time.perf_counter() - started)
        return data


# Base64 and JSON of an image are plain C calls that hold the GIL from start to end; done in
# slices of this many input bytes (a multiple of 3), the event loop gets a turn between them.
_B64_SLICE = 3 * 2**16


def b64_sliced(data: bytes) -> bytes:
    return b"".join(base64.b64encode(data[i : i + _B64_SLICE]) for i in range(0, len(data), _B64_SLICE))


def _images_json(encoded: list[bytes], params: GenerationParams) -> bytes:
    # Built by hand around the base64 bytes: a JSON encoder would copy and scan each
    # multi-megabyte string in one call. The shape is ImageGenerationResponse's.
    items = [
        b'{"b64_json":"' + b64_sliced(data) + b'","seed":' + str(seed).encode() + b"}"
        for data, seed in zip(encoded, params.seeds, strict=True)
    ]
    head = json.dumps(
        {"created": int(time.time()), "output_format": params.output_format, "size": params.size}
    )
    return head[:-1].encode() + b',"data":[' + b",".join(items) + b"]}"


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects. The body has been read, so the next message the
    server can deliver is ``http.disconnect``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.05)  # an unexpected body chunk: do not spin
