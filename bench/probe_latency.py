"""Liveness-probe latency while the server generates, side by side with its floors.

Everything runs on loopback, each part in its own process, as in a cluster where the kubelet
probes from outside:

- ``floor``: a minimal asyncio HTTP responder in its own process: what this machine and
  this prober can do at best;
- ``idle``: the server with nothing to do;
- ``busy``: the server while client processes keep it generating;
- ``idle-health``, ``busy-health``: the same on the health port (``--health-port``), which a
  separate process answers;
- ``floor-busy``: the minimal responder again while the server is busy (machine noise).

With ``--trace-stalls MS`` the server process also arms ``faulthandler`` from its event loop
every millisecond: when the loop does not come back within MS milliseconds, the stacks of
all threads are written to ``stalls.txt`` in the output directory (the watchdog thread runs
without the GIL, so it sees who holds the loop up).

    python bench/probe_latency.py --model builtin://tiny --device cpu --probes 200
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from zimage_server.core.processes import free_port, free_ports, stop_processes

FLOOR_SERVER = """
import asyncio, sys
BODY = b'HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\ncontent-type: text/plain\\r\\n\\r\\nok'
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d):
        if d.endswith(b'\\r\\n\\r\\n'): self.t.write(BODY)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, '127.0.0.1', int(sys.argv[1]))
    await srv.serve_forever()
asyncio.run(main())
"""

# Runs the server with an event-loop watchdog: faulthandler dumps every thread's stack when
# the loop has not re-armed it for the given number of milliseconds.
TRACED_SERVER = """
import asyncio, faulthandler, sys, time
from zimage_server.health import drain
limit_s, path = float(sys.argv[1]) / 1000, sys.argv[2]
out = open(path, "w")
lags = []
async def watch():
    last = time.perf_counter()
    while True:
        faulthandler.dump_traceback_later(limit_s, file=out)
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        lags.append(now - last - 0.001)
        last = now
serve = drain.DrainingServer.serve
async def traced(self, sockets=None):
    task = asyncio.get_running_loop().create_task(watch())
    try:
        await serve(self, sockets)
    finally:
        task.cancel()
        faulthandler.cancel_dump_traceback_later()
        lags.sort()
        if lags:
            n = len(lags)
            print(f"loop lag: n={n} p50={lags[n // 2] * 1e3:.2f}ms p99={lags[int(n * 0.99)] * 1e3:.2f}ms "
                  f"max={lags[-1] * 1e3:.2f}ms", file=sys.stderr, flush=True)
drain.DrainingServer.serve = traced
sys.argv = ["zimage-server", "serve", *sys.argv[3:]]
from zimage_server.cli import main
main()
"""

LOAD = """
import json, sys, httpx
with httpx.Client(timeout=300) as http:
    while True:
        http.post(sys.argv[1] + "/v1/images/generations", json=json.loads(sys.argv[2]))
"""


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read()


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the process exited"
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            status, _ = get(conn, path)
            conn.close()
            if status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{path} on port {port} did not answer 200 in {timeout}s")


def probe(port: int, path: str, count: int, gap_s: float) -> dict[str, float]:
    """``count`` GETs over one keep-alive connection, ``gap_s`` apart, with the collector off."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies = []
    gc.disable()
    try:
        for _ in range(count):
            started = time.perf_counter()
            status, _ = get(conn, path)
            latencies.append((time.perf_counter() - started) * 1000)
            assert status == 200, status
            time.sleep(gap_s)
    finally:
        gc.enable()
        conn.close()
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)],
        "max_ms": latencies[-1],
        "over_5ms": sum(1 for value in latencies if value > 5.0),
        "count": len(latencies),
    }


def images(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    _, body = get(conn, "/metrics")
    conn.close()
    for line in body.decode().splitlines():
        if line.startswith("zimage_images_generated_total "):
            return float(line.split()[1])
    return 0.0


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    stop_processes(procs, grace=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin://tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--format", default="jpeg")
    parser.add_argument("--trace-stalls", type=float, default=0.0, help="milliseconds; 0 = off")
    parser.add_argument("--out", default=".")
    parser.add_argument("server_args", nargs="*", help="more flags for zimage-server serve (after --)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    gap = args.gap_ms / 1000

    floor_port = free_port()
    floor = subprocess.Popen([sys.executable, "-c", FLOOR_SERVER, str(floor_port)])
    port, health_port = free_ports(2)
    serve_args = ["--port", str(port), "--model", args.model, "--device", args.device]
    serve_args += ["--health-port", str(health_port)]
    serve_args += ["--warmup-sizes", args.size, "--vram-limit", "95%", "--max-size", "2048"]
    serve_args += ["--log-level", "warning", *args.server_args]
    if args.trace_stalls:
        command = [sys.executable, "-c", TRACED_SERVER, str(args.trace_stalls), str(out / "stalls.txt")]
    else:
        command = [sys.executable, "-m", "zimage_server", "serve"]
    server = subprocess.Popen([*command, *serve_args])
    load: list[subprocess.Popen[bytes]] = []
    try:
        wait_http(floor_port, "/", floor, 30)
        results["floor"] = probe(floor_port, "/", args.probes, gap)
        wait_http(port, "/healthz/ready", server, 600)
        results["idle"] = probe(port, "/healthz/live", args.probes, gap)
        results["idle-health"] = probe(health_port, "/healthz/live", args.probes, gap)
        body = json.dumps(
            {
                "prompt": "busy",
                "size": args.size,
                "num_inference_steps": args.steps,
                "n": 2,
                "output_format": args.format,
            }
        )
        url = f"http://127.0.0.1:{port}"
        load = [subprocess.Popen([sys.executable, "-c", LOAD, url, body]) for _ in range(args.clients)]
        before = images(port)
        deadline = time.monotonic() + 120
        while images(port) == before:
            assert time.monotonic() < deadline, "no image was generated in 120 s"
            time.sleep(0.05)
        before = images(port)
        results["busy"] = probe(port, "/healthz/live", args.probes, gap)
        results["busy-health"] = probe(health_port, "/healthz/live", args.probes, gap)
        results["floor-busy"] = probe(floor_port, "/", args.probes, gap)
        results["images_while_busy"] = images(port) - before
    finally:
        stop([*load, server, floor])
    for name, row in results.items():
        if isinstance(row, dict):
            print(
                f"{name:12s} p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
                f"max {row['max_ms']:6.2f} ms  over 5 ms: {row['over_5ms']}/{row['count']}"
            )
    print(f"images generated while probing busy: {results.get('images_while_busy', 0):.0f}")
    (out / "probe_latency.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
