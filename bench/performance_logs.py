"""What bench/performance.py reads from a running server and its output: the /metrics
samples, the start-up phases, the warm-up lines of its log, and ``python -X importtime``'s
report."""

from __future__ import annotations

import http.client
import re
from pathlib import Path
from typing import Any


def metric_lines(port: int, name: str) -> list[tuple[str, float]]:
    """``(line, value)`` for each sample of the metric family ``name`` on the server's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return [
        (line, float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    ]


def metric(port: int, name: str) -> float:
    return sum(value for _, value in metric_lines(port, name))


def startup_phases(port: int) -> dict[str, float]:
    """The server's own account of its start: zimage_startup_seconds{phase=...}."""
    return {line.split('"')[1]: value for line, value in metric_lines(port, "zimage_startup_seconds")}


WARMUP_LINE = re.compile(r"warm-up at (\S+), batch (\d+) took ([0-9.]+)s(?:, of which compiling ([0-9.]+)s)?")


def warmup_breakdown(log: Path) -> dict[str, Any]:
    """From a server log: each warm-up call's seconds and dynamo's recompiles with their reasons."""
    text = log.read_text(errors="replace")
    calls = []
    for size, batch, seconds, compiling in WARMUP_LINE.findall(text):
        of_which = f" ({float(compiling):.1f} compiling)" if compiling else ""
        calls.append(f"{size} x{batch}: {float(seconds):.1f}{of_which}")
    recompiles = [line.strip() for line in text.splitlines() if "Recompiling function" in line]
    reasons = [
        line.strip()
        for line in text.splitlines()
        if "triggered by the following guard failure" in line or line.strip().startswith("- ")
    ]
    return {
        "warmup_calls_s": calls,
        "recompiles": len(recompiles),
        "recompile_lines": (recompiles + reasons)[:40],
    }


IMPORT_LINE = re.compile(r"^import time:\s*(\d+) \|\s*(\d+) \| ( *)(\S+)$")


def import_profile(report: str, count: int = 10) -> dict[str, float]:
    """From ``python -X importtime``'s report: seconds of import work per top-level package (the
    sum of its modules' own times, wherever they were imported from), the ``count`` largest,
    and the rest as ``other``."""
    spent: dict[str, float] = {}
    for line in report.splitlines():
        if match := IMPORT_LINE.match(line):
            package = match.group(4).split(".")[0]
            spent[package] = spent.get(package, 0.0) + int(match.group(1)) / 1e6
    ranked = sorted(spent.items(), key=lambda item: item[1], reverse=True)
    profile = dict(ranked[:count])
    if rest := sum(seconds for _, seconds in ranked[count:]):
        profile["other"] = rest
    return profile
