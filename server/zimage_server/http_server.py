"""How the serving port speaks HTTP: uvicorn with its h11 protocol, and the bounds uvicorn does
not have a setting for.

uvicorn bounds a request head's size (``h11_max_incomplete_event_size``) and an idle keep-alive
connection (``timeout_keep_alive``), and its ``limit_concurrency`` answers 503 to *requests*
past a count. Nothing in it bounds the time a request may take to arrive, or the connections
that never finish one: each holds a descriptor until the process runs out. ``BoundedH11Protocol``
adds both: a request (head and body) must arrive whole within ``read_timeout_s`` of its first
byte (or of the connection), and a connection past ``max_connections`` open ones is answered
503 and closed at once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import Settings
from .errors import error_body

logger = logging.getLogger(__name__)

# Descriptors kept for what is not a client connection: the model's files, the health process's
# pipes, the compile caches, the log.
RESERVED_DESCRIPTORS = 128
MAX_HEAD_BYTES = 64 * 1024


def _over_capacity() -> bytes:
    body = json.dumps(
        error_body(
            "the server has too many open connections; retry shortly or reuse a connection",
            "server_error",
            code="too_many_connections",
        )
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


OVER_CAPACITY = _over_capacity()
RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)


class BoundedH11Protocol(H11Protocol):
    def __init__(self, *args: Any, read_timeout_s: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(OVER_CAPACITY)
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state in RECEIVED:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.read_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.conn.their_state not in RECEIVED and not self.transport.is_closing():
            logger.debug("closing a connection whose request did not arrive within %gs", self.read_timeout_s)
            self.transport.close()


def connection_limit(settings: Settings) -> int:
    """``max_connections``, kept below the process's descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    return max(1, min(settings.max_connections, soft - RESERVED_DESCRIPTORS))


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The serving port's uvicorn configuration, with the bounds from ``settings``."""
    limit = connection_limit(settings)
    if limit < settings.max_connections:
        logger.warning(
            "max_connections %d is above what the descriptor limit allows; using %d",
            settings.max_connections,
            limit,
        )
    protocol = functools.partial(
        BoundedH11Protocol, read_timeout_s=settings.request_read_timeout_s, max_connections=limit
    )
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,
        "http": protocol,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "timeout_graceful_shutdown": 10,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
