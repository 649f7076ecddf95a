"""How the serving port speaks HTTP: uvicorn with its h11 protocol, and the bounds uvicorn does
not have a setting for.

uvicorn bounds a request head's size (``h11_max_incomplete_event_size``) and an idle keep-alive
connection (``timeout_keep_alive``), and its ``limit_concurrency`` answers 503 to *requests*
past a count. Nothing in it bounds the time a request may take to arrive, the time a client may
leave its answer unread, or the connections that never finish a request: each holds a
descriptor (and an unread answer its memory) until the process runs out. ``BoundedH11Protocol``
adds them all:

- a request (head and body) must arrive whole within ``read_timeout_s`` of its first byte (or
  of the connection);
- an answer the client does not take, its write buffer above the transport's high-water mark
  (or still unsent after the response ended) for ``send_timeout_s``, cuts the connection and
  drops the buffer;
- past ``max_connections`` open ones, the address holding the most gives up its oldest idle
  connection (``ConnectionTable``); only when every connection is busy with accepted work is a
  new one answered 503 and closed;
- uvicorn's own 400s (a malformed or oversized head) are JSON in the OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from zimage_server.core.config import Settings
from zimage_server.core.connection_table import ConnectionTable, reset
from zimage_server.core.errors import error_body

logger = logging.getLogger(__name__)

# Descriptors kept for what is not a client connection: the model's files, the health process's
# pipes, the compile caches, the log.
RESERVED_DESCRIPTORS = 128
MAX_HEAD_BYTES = 64 * 1024


def _refusal(status: str, message: str, type: str, code: str, *extra: str) -> bytes:
    body = json.dumps(error_body(message, type, code=code)).encode()
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json", *extra, "Connection: close"]
    return ("\r\n".join([*lines, f"Content-Length: {len(body)}", "", ""])).encode() + body


OVER_CAPACITY = _refusal(
    "503 Service Unavailable",
    "the server has too many open connections busy with requests; retry shortly or reuse a connection",
    "server_error",
    "too_many_connections",
    "Retry-After: 1",
)
BAD_REQUEST = _refusal(
    "400 Bad Request",
    "the request is not valid HTTP/1.1; check the request line and headers",
    "invalid_request_error",
    "invalid_http",
)
HEAD_TOO_LARGE = _refusal(
    "431 Request Header Fields Too Large",
    f"the request line and headers are over {MAX_HEAD_BYTES // 1024} KiB; send smaller headers",
    "invalid_request_error",
    "request_header_too_large",
)
# How long a connection refused with a 400 or 431 stays to take the rest of the request unread.
LINGER_S = 1.0
RECEIVED = (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR)
CutCounter = Callable[[str], None]


class BoundedH11Protocol(H11Protocol):
    def __init__(
        self,
        *args: Any,
        read_timeout_s: float,
        send_timeout_s: float,
        table: ConnectionTable[BoundedH11Protocol],
        on_cut: CutCounter | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s
        self.send_timeout_s = send_timeout_s
        self.table = table
        self.on_cut = on_cut or (lambda reason: None)
        self.host = "local"
        self._deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None
        self._discarding = False  # answered a request it could not parse: the rest is dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.client is not None:
            self.host = self.client[0]
        self.table.add(self.host, self)
        if self.table.full:
            found = self.table.victim(BoundedH11Protocol.idle)
            if found is None or found[1] is self:
                self.table.remove(self.host, self)
                self.on_cut("over_capacity")
                transport.write(OVER_CAPACITY)
                transport.close()
                return
            found[1].evict()
        self._arm()

    def idle(self) -> bool:
        """Whether closing this connection loses nothing the server accepted: no request has
        arrived whole and is being answered, or its client does not take its answer."""
        if self.transport.is_closing():
            return False
        answering = self.cycle is not None and not self.cycle.response_complete
        return not answering or self.conn.their_state not in RECEIVED or self.flow.write_paused

    def evict(self) -> None:
        self.table.remove(self.host, self)
        self.on_cut("evicted")
        if self.flow.write_paused or self.transport.get_write_buffer_size():
            self._drop()  # it does not read: what waits for it goes too
        else:  # an idle one is closed as a keep-alive timeout would close it
            self._disarm()
            self.transport.close()

    def _drop(self) -> None:
        """Close now; what waits in the write buffer is discarded (``close`` would wait for a
        client that does not read)."""
        self._disarm()
        self._disarm_send()
        reset(self.transport)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._deadline is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state in RECEIVED:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.remove(self.host, self)
        self._disarm()
        self._disarm_send()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        oversized = len(self.conn.trailing_data[0]) > MAX_HEAD_BYTES
        self.transport.write(HEAD_TOO_LARGE if oversized else BAD_REQUEST)
        # Closed with the rest of the client's request unread, the socket would be reset and
        # the answer lost: end our side, drop what still comes, and close soon after.
        self._discarding = True
        self._disarm()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    # -- the request's arrival -------------------------------------------------------------

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
            self.on_cut("read_timeout")
            self.transport.close()

    # -- the answer's departure ------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_send()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._disarm_send()

    def on_response_complete(self) -> None:
        if self.cycle is not None:
            self.cycle.body = bytearray()  # a body the route did not read: nothing reads it now
        super().on_response_complete()
        if self.transport.get_write_buffer_size():
            self._arm_send()

    def _arm_send(self) -> None:
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.send_timeout_s, self._send_expire)

    def _disarm_send(self) -> None:
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _send_expire(self) -> None:
        self._send_deadline = None
        if self.transport.is_closing() and not self.transport.get_write_buffer_size():
            return
        if self.flow.write_paused or self.transport.get_write_buffer_size():
            logger.info("cutting a client that did not take its answer within %gs", self.send_timeout_s)
            self.on_cut("send_timeout")
            self._drop()


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
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    protocol = functools.partial(
        BoundedH11Protocol,
        read_timeout_s=settings.request_read_timeout_s,
        send_timeout_s=settings.send_timeout_s,
        table=ConnectionTable(limit),
        on_cut=None if metrics is None else metrics.connection_cut,
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
