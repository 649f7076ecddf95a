"""The operator's own metrics, and the health port that serves them with its liveness answer."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from .permissions import REPORT

logger = logging.getLogger(__name__)

RECONCILES = Counter(
    "zimage_operator_reconciles",
    "Reconciles of a ZImageService by outcome: ok, degraded (a problem was reported in its "
    "status), retry (to be retried with backoff)",
    ["outcome"],
)
WRITES = Counter("zimage_operator_writes", "Writes the operator sent to the API server", ["kind", "verb"])
API_REQUESTS = Counter(
    "zimage_operator_api_requests",
    "Requests the operator's own code sent to the API server (Kopf's watches aside), by verb",
    ["verb"],
)
ERRORS = Counter(
    "zimage_operator_errors",
    "Failures by kind: unreachable (the API server), api (an error answer), internal (a bug)",
    ["kind"],
)
DECISIONS = Counter(
    "zimage_operator_autoscaler_decisions",
    "Built-in autoscaler decisions by direction: up, down, hold",
    ["direction"],
)
SERVICE_LOOPS = Gauge(
    "zimage_operator_service_loops",
    "ZImageServices the operator's passes look after (resync, built-in autoscaler)",
)
API_REACHABLE = Gauge("zimage_operator_api_reachable", "1 while the API server answers, 0 during an outage")
API_REACHABLE.set(1)
LEADER = Gauge("zimage_operator_leader", "1 while this replica leads and acts, 0 while it stands by")


async def _healthz(request: web.Request) -> web.Response:
    # Answered by the operator's own event loop: when that stalls or dies, liveness fails; and
    # while the operator's account may not watch what it serves (a restart may pick up a grant).
    problem = REPORT.health_problem()
    if problem is not None:
        return web.Response(status=503, text=f"{problem}\n")
    return web.Response(text="ok\n")


async def _metrics(request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def start_health_server(host: str, port: int) -> web.AppRunner:
    """``/healthz`` and ``/metrics`` on ``host:port``; stop it with ``await runner.cleanup()``."""
    app = web.Application()
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    logger.info("health and metrics on http://%s:%d", host, port)
    return runner


class _StandbyHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/metrics":
            status, body, kind = 200, generate_latest(), CONTENT_TYPE_LATEST
        elif self.path == "/healthz":
            status, body, kind = 200, b"ok (standing by)\n", "text/plain"
        else:
            status, body, kind = 404, b"not found\n", "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_standby(host: str, port: int) -> ThreadingHTTPServer:
    """``/healthz`` and ``/metrics`` while the replica stands by (Kopf, which serves them once
    it leads, is not running yet); stop it with ``shutdown()`` and ``server_close()``."""
    server = ThreadingHTTPServer((host, port), _StandbyHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="standby-health", daemon=True).start()
    return server
