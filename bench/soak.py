"""A bounded soak of the server: minutes of mixed valid, invalid and abusive traffic on loopback,
with the server's memory, the answers' status counts and the health probe's latency over time.

The server runs in its own process (the tiny model on the CPU unless told otherwise, its
probes on a health port). Client threads, all on 127.0.0.1, keep up:

- ``valid``: image requests, a few at a time, each client sending its next when answered;
- ``invalid``: bad sizes, unknown fields, broken JSON, blank and unpaired-surrogate prompts;
- ``flood``: bursts past the queue (429 expected), some clients leaving mid-request;
- ``oversize``: bodies over the limit (413 expected);
- ``slowloris``: connections that send half a request head and hold it (closed by the server);
- ``probe``: the health port's liveness, ten times a second, timed, from a process of its own
  and a new connection each time, as the kubelet makes it;

and, from other loopback addresses as other pods would (``--no-hostile`` leaves them out):

- ``health-hold``: 3000 idle connections and 300 that pipeline probes and never read, held
  against the health port and reopened as the server closes them;
- ``api-hold``: 3000 idle connections held against the serving port, reopened likewise;
- ``nonreader``: requests for four images whose answers are never read (cut by the server);
- ``bodiless``: 1 MB of a declared 1 MiB body sent to ``GET /load``, 50 connections at a time.

The well-behaved kinds (valid, invalid, oversize, probe) must never see a 5xx.

Every ``--sample-s`` seconds it records the server's RSS and the status counts so far. At the
end it prints a Markdown table and writes everything as JSON. Nothing leaves loopback, the
traffic is bounded in count (threads) and time (``--minutes``).

    python bench/soak.py --minutes 10 --out .out/soak
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing
import os
import queue
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from zimage_server.core.processes import free_ports, stop_process

HOST = "127.0.0.1"
TCP_ESTABLISHED = 1  # tcp_info.tcpi_state: the server has neither closed nor reset it
IP_BIND_ADDRESS_NO_PORT = 24  # Linux; not in the socket module before Python 3.12
VALID = {"prompt": "a lighthouse in a storm", "size": "256x256", "num_inference_steps": 2}
INVALID: list[tuple[str, bytes]] = [
    ("size", json.dumps({**VALID, "size": "1000x1000"}).encode()),
    ("unknown-field", json.dumps({**VALID, "num_inference_step": 4}).encode()),
    ("broken-json", b'{"prompt": "a fox"'),
    ("blank-prompt", json.dumps({**VALID, "prompt": "\u200b \u3000"}).encode()),
    ("surrogate", json.dumps({**VALID, "prompt": "x\ud800"}).encode()),
    ("deep-nesting", b'{"prompt": "x", "user": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("huge-number", b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}"),
]


class Counts:
    def __init__(self) -> None:
        self.by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.lock = threading.Lock()

    def add(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.by_kind[kind][outcome] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self.lock:
            return {kind: dict(counter) for kind, counter in self.by_kind.items()}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def error_code(status: int, body: bytes) -> str:
    """The status, and for a 5xx the error's code from its body, so that a report says which."""
    if status < 500:
        return str(status)
    found = re.search(rb'"(?:code|phase)":\s*"([^"]+)"', body)
    return f"{status} {found.group(1).decode() if found else body[:60].decode(errors='replace')}"


def post(http: httpx.Client, url: str, body: bytes) -> str:
    try:
        response = http.post(url, content=body, headers={"Content-Type": "application/json"})
        return error_code(response.status_code, response.content)
    except httpx.HTTPError as exc:
        return type(exc).__name__


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def connect(port: int, source: str, receive_buffer: int | None = None) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    # The port is picked at connect, knowing the server's end: bound first, it may collide with
    # one of the server's closed connections still in TIME_WAIT, and the connect stalls a second.
    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    try:
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect((HOST, port))
    except OSError:
        sock.close()
        return None
    sock.setblocking(False)
    return sock


def closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock``; what it sent is read and dropped."""
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


# At most this many connections opened per holder every 2 s: bounded load, which on one small
# machine would otherwise take the CPU the server needs (another pod's would not).
REOPEN_PER_PASS = 250


def hold(
    port: int,
    count: int,
    source: str,
    kind: str,
    counts: Counts,
    stop: threading.Event,
    first: bytes = b"",
    pipelining: bool = False,
) -> None:
    """Keep ``count`` connections open from ``source``, reopening those the server closes
    (``REOPEN_PER_PASS`` every 2 s); each sends ``first`` (what fits). A ``pipelining`` one has a
    small receive buffer and is never read, so whether the server closed it is not looked at."""
    held: list[socket.socket] = []
    while not stop.is_set():
        alive = []
        for sock in held:
            if pipelining or not closed(sock):
                alive.append(sock)
            else:
                counts.add(kind, "closed by server")
                sock.close()
        held = alive
        for _ in range(min(count - len(held), REOPEN_PER_PASS)):
            sock = connect(port, source, receive_buffer=4096 if pipelining else None)
            if sock is None:
                counts.add(kind, "connect failed")
                break
            if first:
                with contextlib.suppress(OSError):
                    sock.send(first)
            held.append(sock)
        stop.wait(2)
    for sock in held:
        sock.close()


def hostile_clients(url: str, health_url: str, counts: Counts, stop: threading.Event) -> list[Any]:
    port, health_port = port_of(url), port_of(health_url.split("//", 1)[1])
    probe = b"GET /healthz/live HTTP/1.1\r\nHost: x\r\n\r\n"

    def health_hold() -> None:
        hold(health_port, 3000, "127.0.0.2", "health-hold", counts, stop)

    def health_pipeline() -> None:
        hold(health_port, 300, "127.0.0.3", "health-pipeline", counts, stop, probe * 2000, pipelining=True)

    def api_hold() -> None:
        hold(port, 3000, "127.0.0.4", "api-hold", counts, stop)

    def nonreader() -> None:
        body = json.dumps({**VALID, "n": 4, "size": "768x768", "num_inference_steps": 1})
        request = (
            f"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
        held: list[socket.socket] = []
        while not stop.is_set():
            sock = connect(port, "127.0.0.5", receive_buffer=4096)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.send(request)
                held.append(sock)
            stop.wait(5)
            alive = []
            for old in held:  # looked at without reading what the server sent
                gone = old.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED
                if gone or len(alive) > 20:
                    counts.add("nonreader", "closed by server" if gone else "given up")
                    old.close()
                else:
                    alive.append(old)
            held = alive
        for sock in held:
            sock.close()

    def bodiless() -> None:
        data = b"GET /load HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n" + b"x" * 1_000_000
        while not stop.is_set():
            socks = [sock for sock in (connect(port, "127.0.0.6") for _ in range(50)) if sock is not None]
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.send(data)
            stop.wait(2)
            for sock in socks:
                sock.setblocking(True)
                sock.settimeout(5)
                try:
                    answer = sock.recv(4096)
                    status = answer[9:12].decode()
                    counts.add("bodiless", error_code(int(status), answer) if status.isdigit() else "closed")
                except OSError as exc:
                    counts.add("bodiless", type(exc).__name__)
                sock.close()

    return [health_hold, health_pipeline, api_hold, nonreader, bodiless]


def probe_loop(url: str, answers: Any, ended: Any) -> None:
    """Liveness ten times a second, a new connection each time as the kubelet makes it (one
    client, made once: a new httpx client per probe would time its TLS set-up too)."""
    with httpx.Client(timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        while not ended.is_set():
            started = time.perf_counter()
            try:
                response = http.get(url)
                status = error_code(response.status_code, response.content)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            answers.put((status, (time.perf_counter() - started) * 1000))
            ended.wait(0.1)


WELL_BEHAVED = ("valid", "invalid", "oversize", "probe")


def run_clients(
    url: str,
    health_url: str,
    counts: Counts,
    stop: threading.Event,
    probes: list[float],
    hostile: bool = True,
) -> list[threading.Thread]:
    gen = f"{url}/v1/images/generations"
    valid_body = json.dumps(VALID).encode()

    def valid() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                counts.add("valid", post(http, gen, valid_body))

    def invalid() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                for name, body in INVALID:
                    counts.add(f"invalid:{name}", post(http, gen, body))
                stop.wait(0.2)

    def one_of_a_flood() -> None:
        with httpx.Client(timeout=60) as http:
            counts.add("flood", post(http, gen, valid_body))

    def flood() -> None:
        while not stop.is_set():
            burst = [threading.Thread(target=one_of_a_flood) for _ in range(12)]
            for thread in burst:
                thread.start()
            # Two clients that leave before their answer.
            for _ in range(2):
                with contextlib.suppress(httpx.HTTPError), httpx.Client(timeout=0.05) as http:
                    http.post(gen, content=valid_body, headers={"Content-Type": "application/json"})
                counts.add("flood", "left")
            for thread in burst:
                thread.join()
            stop.wait(3)

    def oversize() -> None:
        body = json.dumps({**VALID, "user": "x" * (2 * 2**20)}).encode()
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                counts.add("oversize", post(http, gen, body))
                stop.wait(1)

    def slowloris() -> None:
        half = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
        hold(port_of(url), 50, HOST, "slowloris", counts, stop, first=half)

    def probe() -> None:
        # The kubelet is a process of its own: timed here among the client threads, a probe
        # would also count the wait for this process's GIL.
        context = multiprocessing.get_context("spawn")
        answers: Any = context.Queue()
        ended = context.Event()
        prober = context.Process(target=probe_loop, args=(health_url, answers, ended), daemon=True)
        prober.start()
        while not stop.is_set() or prober.is_alive():
            if stop.is_set():
                ended.set()
            with contextlib.suppress(queue.Empty):
                status, ms = answers.get(timeout=0.5)
                probes.append(ms)
                counts.add("probe", status)

    workers = [valid, valid, valid, invalid, flood, oversize, slowloris, probe]
    if hostile:
        workers += hostile_clients(url, health_url, counts, stop)
    threads = [threading.Thread(target=worker, daemon=True) for worker in workers]
    for thread in threads:
        thread.start()
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--model", default="builtin://tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(".out/soak"))
    parser.add_argument("--no-hostile", action="store_true", help="leave out the hostile clients")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    port, health_port = free_ports(2)
    command = [
        sys.executable,
        "-m",
        "zimage_server",
        "serve",
        "--port",
        str(port),
        "--health-port",
        str(health_port),
    ]
    command += ["--model", args.model, "--device", args.device, "--warmup-sizes", VALID["size"]]
    command += ["--max-queue", "8", "--min-size", "64", "--log-level", "warning"]
    log = (args.out / "server.log").open("w")
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    url, health_url = f"http://{HOST}:{port}", f"http://{HOST}:{health_port}/healthz/live"
    counts, probes, samples = Counts(), [], []
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}; see {args.out / 'server.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz/ready").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the server did not get ready")
            time.sleep(0.2)
        started = time.monotonic()
        samples.append({"t_s": 0.0, "rss_mib": rss_bytes(server.pid) / 2**20, "counts": {}})
        threads = run_clients(url, health_url, counts, stop, probes, hostile=not args.no_hostile)
        end = started + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
            window = probes[-int(args.sample_s * 10) :] or [0.0]
            samples.append(
                {
                    "t_s": round(time.monotonic() - started, 1),
                    "rss_mib": rss_bytes(server.pid) / 2**20,
                    "probe_p50_ms": statistics.median(window),
                    "probe_p99_ms": sorted(window)[max(0, int(len(window) * 0.99) - 1)],
                    "counts": counts.snapshot(),
                }
            )
            print(f"{samples[-1]['t_s']:7.1f}s  RSS {samples[-1]['rss_mib']:8.1f} MiB", flush=True)
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
    finally:
        stop.set()
        code = stop_process(server, grace=60)
        log.close()
    report = summarize(samples, counts.snapshot(), probes, code)
    (args.out / "soak.json").write_text(json.dumps({"samples": samples, **report}, indent=2))
    print(report["markdown"])


def summarize(
    samples: list[dict[str, Any]], counts: dict[str, dict[str, int]], probes: list[float], code: int
) -> dict[str, Any]:
    # The level after the first minute of traffic: the allocator's caches and the first
    # requests' buffers are in by then.
    settled = next((s for s in samples if s["t_s"] >= 60), samples[-1])
    last = samples[-1]
    statuses: collections.Counter[str] = collections.Counter()
    for outcomes in counts.values():
        statuses.update(outcomes)
    server_errors = sum(n for status, n in statuses.items() if status.startswith("5"))
    # What a well-behaved client saw: no 5xx, no failed connection.
    behaved_errors = sum(
        n
        for kind, outcomes in counts.items()
        if kind.split(":", 1)[0] in WELL_BEHAVED
        for status, n in outcomes.items()
        if not status[:1].isdigit() or status.startswith("5")
    )
    lines = ["| time | RSS (MiB) | probe p50 / p99 (ms) |", "|---|---|---|"]
    for sample in samples:
        probe = (
            f"{sample['probe_p50_ms']:.2f} / {sample['probe_p99_ms']:.2f}"
            if "probe_p50_ms" in sample
            else "-"
        )
        lines.append(f"| {sample['t_s']:.0f} s | {sample['rss_mib']:.0f} | {probe} |")
    lines += ["", "| traffic | answers |", "|---|---|"]
    for kind in sorted(counts):
        lines.append(
            f"| {kind} | {', '.join(f'{status}: {n}' for status, n in sorted(counts[kind].items()))} |"
        )
    growth = last["rss_mib"] / settled["rss_mib"] - 1
    p99 = sorted(probes)[max(0, int(len(probes) * 0.99) - 1)] if probes else float("nan")
    lines += [
        "",
        f"RSS at ready {samples[0]['rss_mib']:.0f} MiB, after the first minute {settled['rss_mib']:.0f} MiB, "
        f"at the end {last['rss_mib']:.0f} MiB ({growth:+.1%}); 5xx answers: {server_errors}, "
        f"5xx or failed connections to well-behaved clients: {behaved_errors}; "
        f"probes: {len(probes)}, p99 {p99:.2f} ms; server exit code {code}",
    ]
    return {
        "statuses": dict(statuses),
        "rss_growth": growth,
        "server_errors": server_errors,
        "well_behaved_errors": behaved_errors,
        "probe_p99_ms": p99,
        "markdown": "\n".join(lines),
    }


if __name__ == "__main__":
    main()
