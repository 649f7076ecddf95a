"""The health process: answers ``/healthz/{live,ready,startup}`` on its own port.

Started by the serving process when ``health_port`` is set, as
``python -m zimage_server.health.health_server BOARD HOST PORT STALL_S PARENT_PID``. It imports the
standard library only, serves from the board the serving process publishes, and exits when
its parent is gone. Liveness also fails when the serving process's heartbeat is older than
``STALL_S`` seconds: its event loop is stuck.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from zimage_server.core.connection_table import ConnectionTable, reset
from zimage_server.health.health_board import PROBES, HealthBoard

PATHS = {f"/healthz/{name}": name for name in PROBES}
# One event loop answers every connection, so idle ones cost a socket, not a thread. A request
# head must arrive whole within HEAD_TIMEOUT_S, an idle keep-alive connection is closed after
# IDLE_TIMEOUT_S, and an answer the client does not take within SEND_TIMEOUT_S (one that
# pipelines requests and never reads) cuts its connection. Past MAX_CONNECTIONS open ones, the
# address that holds the most loses its oldest (ConnectionTable), so a new probe always gets in.
HEAD_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 5.0  # the kubelet does not keep probe connections alive
SEND_TIMEOUT_S = 5.0
MAX_CONNECTIONS = 256
MAX_HEAD_BYTES = 8192


def answer(board: HealthBoard, probe: str, stall_s: float) -> tuple[int, dict[str, Any]]:
    responses, age = board.read()
    if probe not in responses:
        return 503, {"status": "unavailable", "phase": "starting", "detail": "the server is starting"}
    status, body = responses[probe]
    if probe == "live" and age > stall_s:
        detail = f"the serving process's event loop has not run for {age:.1f}s (limit {stall_s:g}s)"
        return 503, {**body, "status": "unavailable", "detail": detail, "stalled_seconds": round(age, 1)}
    return status, body


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def respond(board: HealthBoard, stall_s: float, head: bytes) -> tuple[bytes, bool]:
    """The response to one request ``head`` (request line and headers), and whether the
    connection stays open for another. Probes carry no body; a request that has one is
    answered and its connection closed."""
    request_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    parts = request_line.split(" ")
    keep = False
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        status, body = 400, {"detail": "not an HTTP/1.x request"}
    else:
        method, target, version = parts
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        connection = headers.get("connection", "keep-alive" if version == "HTTP/1.1" else "close")
        keep = connection != "close" and not {"content-length", "transfer-encoding"} & headers.keys()
        probe = PATHS.get(target.split("?", 1)[0])
        if method != "GET":
            status, body = 405, {"detail": f"{method} is not allowed; probes are GET"}
        elif probe is None:
            status, body = 404, {"detail": f"{target} is not served here; try one of {sorted(PATHS)}"}
        else:
            status, body = answer(board, probe, stall_s)
    data = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", "Content-Type: application/json"]
    lines += [f"Content-Length: {len(data)}"] + ([] if keep else ["Connection: close"])
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data, keep


class HealthServer:
    def __init__(self, board: HealthBoard, stall_s: float) -> None:
        self.board, self.stall_s = board, stall_s
        self.table: ConnectionTable[asyncio.StreamWriter] = ConnectionTable(MAX_CONNECTIONS)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) else "local"
        self.table.add(host, writer)
        try:
            if self.table.full:
                # Every connection waits on its client here (for a request, or to read an
                # answer): any may go, and the heaviest address's oldest does.
                found = self.table.victim(lambda conn: True)
                if found is not None:
                    self.table.remove(*found)
                    reset(found[1].transport)
            timeout = HEAD_TIMEOUT_S
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
                except (
                    TimeoutError,
                    asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError,
                    ConnectionError,
                ):
                    return
                data, keep = respond(self.board, self.stall_s, head)
                writer.write(data)
                try:
                    await asyncio.wait_for(writer.drain(), SEND_TIMEOUT_S)
                except TimeoutError:
                    reset(writer.transport)  # it does not read: drop what waits for it
                    return
                if not keep:
                    return
                timeout = IDLE_TIMEOUT_S
        except ConnectionError:
            return
        finally:
            self.table.remove(host, writer)
            writer.close()


async def _serve(board: HealthBoard, host: str, port: int, stall_s: float, parent: int) -> int:
    handler = HealthServer(board, stall_s)
    try:
        server = await asyncio.start_server(handler.serve, host, port, limit=MAX_HEAD_BYTES, backlog=1024)
    except OSError as exc:
        print(f"zimage-server health: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    print("listening", flush=True)
    async with server:
        while os.getppid() == parent:  # noqa: ASYNC110 (no event tells of a parent gone)
            await asyncio.sleep(0.5)
    return 0


def main(argv: list[str]) -> int:
    board_path, host, port, stall_s, parent = argv
    board = HealthBoard.open(board_path)
    try:
        return asyncio.run(_serve(board, host, int(port), float(stall_s), int(parent)))
    finally:
        board.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
