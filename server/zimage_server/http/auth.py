"""API keys for the images API: the accepted keys, and the middleware that asks for one.

Keys come from a file (``api_keys_file``; the operator mounts the Secret there, so a rotated
Secret takes effect without a restart) or from ``api_keys``. A client sends one as
``Authorization: Bearer KEY`` (what the official ``openai`` client sends) or ``x-api-key: KEY``.
The health port, the load signal and the metrics stay open to the kubelet, the autoscaler and
Prometheus. Keys are never logged and never echoed.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from zimage_server.core.errors import error_body
from zimage_server.core.keys import read_key_file

logger = logging.getLogger(__name__)

# What a key guards: the images API.
PROTECTED_PREFIXES = ("/v1/", "/generate")
RECHECK_S = 1.0  # how often the key file is looked at for a change


class KeyRing:
    """The keys a request may carry. With a file, re-read when the file changes; a file that
    turns empty or unreadable keeps the last good keys (a rotation half done) and says so."""

    def __init__(self, keys: frozenset[str], path: str | None = None) -> None:
        self.path = path
        self._keys = [key.encode() for key in keys]
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str) -> KeyRing:
        return cls(read_key_file(path), path)

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked < RECHECK_S:
            return
        with self._lock:
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                keys = read_key_file(self.path)
            except ValueError as exc:
                logger.warning("%s; keeping the %d keys read before", exc, len(self._keys))
                return
            self._keys = [key.encode() for key in keys]
            logger.info("API keys reloaded from %s: %d keys", self.path, len(keys))

    def accepts(self, token: bytes) -> bool:
        """Whether ``token`` is one of the keys, compared in constant time against every key."""
        self._refresh()
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(token, key)
        return found


class ApiKeyMiddleware:
    """401 for a request to the images API without an accepted key. Checked before the body is
    read, so a client without a key cannot make the server read one."""

    def __init__(self, app: ASGIApp, ring: KeyRing) -> None:
        self.app = app
        self.ring = ring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        tokens = presented_keys(scope)
        if any(self.ring.accepts(token) for token in tokens):
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send it as 'Authorization: Bearer KEY' (or 'x-api-key: KEY')"
            if not tokens
            else "invalid API key; check the key your administrator gave you"
        )
        response = JSONResponse(
            error_body(message, "invalid_request_error", code="invalid_api_key"),
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="zimage"'},
        )
        await response(scope, receive, send)


def presented_keys(scope: Scope) -> list[bytes]:
    """The keys a request carries: its bearer token and its ``x-api-key`` header; one that is
    right is enough (a stale header beside it does not hide it)."""
    found = []
    for name, value in scope.get("headers") or []:
        lowered = name.lower()
        if lowered == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                found.append(bytes(token.strip()))
        elif lowered == b"x-api-key" and value.strip():
            found.append(bytes(value.strip()))
    return found
