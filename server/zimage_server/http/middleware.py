"""ASGI middleware: request metrics by route and status, the request's own bounds (head, body),
and the last word for a request cancelled at shutdown."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zimage_server.core.errors import draining_error, error_body
from zimage_server.core.metrics import Metrics


class RequestMetricsMiddleware:
    # Pure ASGI (not BaseHTTPMiddleware), so the receive channel stays untouched and a
    # handler can still see the client disconnect.
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


class BodyTooLargeError(StarletteHTTPException):
    """Raised from ``receive`` when a body read past the limit; FastAPI passes it on as it is
    (any other exception from reading a body becomes its 400) and errors.py answers 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is over the limit of {max_bytes} bytes; send a smaller one")


class RequestLimitMiddleware:
    """The request's own bounds, none of which reads a body no route asked for:

    - a head (request line and headers) over ``MAX_HEAD_BYTES``: 431 (uvicorn's parser only
      bounds a head that arrives in pieces);
    - a ``Content-Length`` over ``max_bytes``: 413 at once, nothing read;
    - a body that grows past ``max_bytes`` as the route reads it: 413 then. A route that takes no
      body never reads one, and the server drops it unread (``http_server.py``).

    FastAPI's own ``max_body_size`` counts the same way, but swaps any answer to a request whose
    ``Content-Length`` is over the limit for a text/plain 413, a keyless request's 401 included.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, max_head_bytes: int, route_max_bytes: dict[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_head_bytes = max_head_bytes
        self.route_max_bytes = route_max_bytes or {}  # path -> its own body limit (uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 16
        head += sum(len(name) + len(value) + 4 for name, value in headers)
        if head > self.max_head_bytes:
            limit = self.max_head_bytes // 1024
            message = f"the request line and headers are over {limit} KiB; send smaller headers"
            await _refuse(send, 431, message, "request_header_too_large")
            return
        limit = self.route_max_bytes.get(scope.get("path", ""), self.max_bytes)
        for name, value in headers:
            if name.lower() == b"content-length" and value.isdigit() and int(value) > limit:
                message = (
                    f"the request body ({int(value)} bytes) is over the limit of {limit} bytes; "
                    "send a smaller one"
                )
                await _refuse(send, 413, message, "request_too_large")
                return
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    raise BodyTooLargeError(limit)
            return message

        await self.app(scope, counted, send)


async def _refuse(send: Send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(message, "invalid_request_error", code=code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class LastWordMiddleware:
    """A request whose handler was cancelled before it answered (uvicorn's shutdown
    cancels what is still running when its grace ends) gets the OpenAI-shaped 503 ``draining``
    instead of uvicorn's text/plain 500, and ends there."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if started:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            refusal = draining_error("could not finish this request")
            body = json.dumps(error_body(refusal.message, refusal.type, code=refusal.code)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", b"1"),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
