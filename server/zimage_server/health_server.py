"""The health process: answers ``/healthz/{live,ready,startup}`` on its own port.

Started by the serving process when ``health_port`` is set, as
``python -m zimage_server.health_server BOARD HOST PORT STALL_S PARENT_PID``. It imports the
standard library only, serves from the board the serving process publishes, and exits when
its parent is gone. Liveness also fails when the serving process's heartbeat is older than
``STALL_S`` seconds: its event loop is stuck.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .health_board import PROBES, HealthBoard

PATHS = {f"/healthz/{name}": name for name in PROBES}


def answer(board: HealthBoard, probe: str, stall_s: float) -> tuple[int, dict[str, Any]]:
    responses, age = board.read()
    if probe not in responses:
        return 503, {"status": "unavailable", "phase": "starting", "detail": "the server is starting"}
    status, body = responses[probe]
    if probe == "live" and age > stall_s:
        detail = f"the serving process's event loop has not run for {age:.1f}s (limit {stall_s:g}s)"
        return 503, {**body, "status": "unavailable", "detail": detail, "stalled_seconds": round(age, 1)}
    return status, body


def make_handler(board: HealthBoard, stall_s: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the kubelet's and most clients' HTTP
        # Headers and body leave in two writes; without TCP_NODELAY the body would wait for the
        # client's delayed ACK (40 ms on Linux).
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            probe = PATHS.get(self.path.split("?", 1)[0])
            if probe is None:
                status, body = 404, {"detail": f"{self.path} is not served here; try one of {sorted(PATHS)}"}
            else:
                status, body = answer(board, probe, stall_s)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # probes are not worth a log line
            pass

    return Handler


def _watch_parent(parent: int, server: ThreadingHTTPServer) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    server.shutdown()


def main(argv: list[str]) -> int:
    board_path, host, port, stall_s, parent = argv
    board = HealthBoard.open(board_path)
    try:
        server = ThreadingHTTPServer((host, int(port)), make_handler(board, float(stall_s)))
    except OSError as exc:
        print(f"zimage-server health: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 2
    server.daemon_threads = True
    threading.Thread(target=_watch_parent, args=(int(parent), server), daemon=True).start()
    print("listening", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        board.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
