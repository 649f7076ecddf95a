"""ASGI middleware: request metrics by route and status, and API keys for the images API."""

from __future__ import annotations

import hmac
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body
from .metrics import Metrics


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


# What a key guards: the images API. Probes, the load signal and metrics stay open to the
# kubelet, the autoscaler and Prometheus.
PROTECTED_PREFIXES = ("/v1/", "/generate")


class ApiKeyMiddleware:
    """401 for a request to the images API without one of ``keys`` as its bearer token.

    Checked before the body is read, so a client without a key cannot make the server read one."""

    def __init__(self, app: ASGIApp, keys: frozenset[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if token is not None and any(hmac.compare_digest(token, key) for key in self.keys):
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send it as 'Authorization: Bearer KEY'"
            if token is None
            else "invalid API key; check the key your administrator gave you"
        )
        response = JSONResponse(
            error_body(message, "invalid_request_error", code="invalid_api_key"),
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


def _bearer(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers") or []:
        if name.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return bytes(token.strip())
    return None
