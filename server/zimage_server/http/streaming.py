"""``stream: true``: the OpenAI Images API's server-sent events for one request.

Each image sends its partial images (``image_generation.partial_image``, ``partial_image_index``
0 up) and then ``image_generation.completed`` (``image_edit.*`` for an edit), as the official
clients read them; with ``n`` > 1
each event also names its image (``image_index``, an extension). An error after the stream has
started is a last event ``{"error": {...}}``, which the official clients raise. With
``stream_progress`` the stream also carries ``zimage.queue`` (place in the queue) and
``zimage.progress`` (steps done) events, for pages that show progress.

Errors found before any work is queued (a bad field, a full queue, a server not ready) are
plain HTTP errors, as for any request: the stream starts only once the work is queued.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from PIL import Image

from zimage_server.core.errors import APIError, error_body
from zimage_server.http.service import b64_sliced

if TYPE_CHECKING:
    from zimage_server.engine.engine import Job
    from zimage_server.http.service import GenerationParams, ImageService

logger = logging.getLogger(__name__)

# How often the stream looks at the queue, the deadline and the job's fate while nothing comes.
TICK_S = 0.25
# A comment line after this long without an event, so that proxies keep the connection.
KEEPALIVE_S = 10.0


def sse(event: str, payload: dict[str, Any], b64: bytes | None = None) -> bytes:
    """One event; ``b64`` (the image, base64) is spliced in as ``b64_json`` without a JSON
    encoder scanning megabytes of it."""
    data = json.dumps(payload).encode()
    if b64 is not None:
        data = b'{"b64_json":"' + b64 + b'",' + data[1:]
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def error_event(exc: BaseException) -> bytes:
    if isinstance(exc, APIError):
        body = error_body(exc.message, exc.type, exc.param, exc.code)
    else:
        logger.error("a streamed request failed: %s", exc)
        body = error_body(
            "the generation failed on the server; the server log has the details",
            "server_error",
            code="generation_failed",
        )
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"


class ImageStream:
    def __init__(self, service: ImageService, job: Job, params: GenerationParams) -> None:
        self.service = service
        self.job = job
        self.params = params
        # The OpenAI API's event names: image_generation.* for generations, image_edit.* for edits.
        self.event_prefix = "image_generation" if params.edit is None else "image_edit"
        self.created = int(time.time())
        self.common = {
            "created_at": self.created,
            "size": params.size,
            "output_format": params.output_format,
            "quality": "auto",
            "background": "opaque",
        }

    @functools.cached_property
    def usage(self) -> dict[str, Any]:
        """The prompt's tokens, the same for each image of the request."""
        text = self.service.engine.prompt_tokens(self.params.prompt)
        return {
            "input_tokens": text,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": text},
            "output_tokens": 0,
            "total_tokens": text,
        }

    async def _image_event(self, event: str, image: Image.Image, fields: dict[str, Any]) -> bytes:
        loop = asyncio.get_running_loop()
        service, params = self.service, self.params
        b64 = await loop.run_in_executor(
            service.encoder, lambda: b64_sliced(service.encode_one(image, params))
        )
        return sse(event, {"type": event, **fields, **self.common}, b64)

    async def events(self) -> AsyncIterator[bytes]:
        job, params, engine = self.job, self.params, self.service.engine
        assert job.events is not None
        deadline = job.arrived + self.service.settings.request_timeout_s
        completed = 0
        position: int | None = None
        sent: set[tuple[int, int]] = set()  # (image, partial) already sent
        last_sent = time.monotonic()
        try:
            while completed < len(params.seeds):
                failure = job.future.exception() if job.future.done() else None
                if failure is not None and job.events.empty():
                    yield error_event(failure)
                    return
                if time.monotonic() > deadline:
                    engine.cancel(job, "timeout")
                    yield error_event(self.service.timeout_error())
                    return
                if params.progress and position != (place := engine.position(job)):
                    position = place
                    yield sse("zimage.queue", {"type": "zimage.queue", "position": place})
                    last_sent = time.monotonic()
                try:
                    event = await asyncio.wait_for(job.events.get(), TICK_S)
                except TimeoutError:
                    if time.monotonic() - last_sent > KEEPALIVE_S:
                        yield b": waiting\n\n"
                        last_sent = time.monotonic()
                    continue
                kind = event[0]
                if kind == "step":
                    if params.progress:
                        payload = {"type": "zimage.progress", "step": event[1], "steps": event[2]}
                        yield sse("zimage.progress", {**payload, "images_done": completed})
                elif kind == "partial":
                    _, index, partial_index, image = event
                    if (index, partial_index) in sent:  # its batch failed and it runs again alone
                        continue
                    sent.add((index, partial_index))
                    fields = {"partial_image_index": partial_index, "image_index": index}
                    yield await self._image_event(f"{self.event_prefix}.partial_image", image, fields)
                elif kind == "image":
                    _, index, image = event
                    fields = {"image_index": index, "seed": params.seeds[index], "usage": self.usage}
                    yield await self._image_event(f"{self.event_prefix}.completed", image, fields)
                    completed += 1
                last_sent = time.monotonic()
        finally:
            if completed < len(params.seeds):  # the client left, or the stream ended early
                engine.cancel(job, "disconnect")
