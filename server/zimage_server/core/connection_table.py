"""A connection cap shared fairly between client addresses.

Past the cap, a new connection does not lose to the ones already open: the address that holds
the most gives up its oldest connection that is doing nothing the server must finish (waiting
for a request, or waiting for its client to read). So one client that opens thousands of idle
sockets only ever displaces its own, and the kubelet's probe or another client still gets in.
A newcomer is refused only when every connection is busy with work the server has accepted.

Standard library only: the health process imports it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class ConnectionTable(Generic[C]):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._by_host: dict[str, dict[C, None]] = {}  # insertion order: oldest first
        self.count = 0

    def add(self, host: str, conn: C) -> None:
        self._by_host.setdefault(host, {})[conn] = None
        self.count += 1

    def remove(self, host: str, conn: C) -> None:
        held = self._by_host.get(host)
        if held is None or conn not in held:
            return
        del held[conn]
        self.count -= 1
        if not held:
            del self._by_host[host]

    @property
    def full(self) -> bool:
        return self.count > self.limit

    def victim(self, evictable: Callable[[C], bool]) -> tuple[str, C] | None:
        """The connection to close for a newcomer: the oldest ``evictable`` one of the address
        holding the most (then the next address), or None when none may go."""
        for host in sorted(self._by_host, key=lambda name: len(self._by_host[name]), reverse=True):
            for conn in self._by_host[host]:
                if evictable(conn):
                    return host, conn
        return None


def reset(transport: Any) -> None:
    """Close ``transport`` at once with a reset: what waits for its client, in the process and in
    the kernel's send buffer, is dropped (a plain close would leave the kernel sending it to a
    client that does not read)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
