"""``make demo``: the local control plane, the chart, the minimal example on the tiny model, and
the playground's address on loopback. ``make demo-down`` stops and removes all of it.

    python -m tests.cluster.demo up [--dir .demo]     # start; prints the playground's URL
    python -m tests.cluster.demo down [--dir .demo]   # stop every process by PID, remove the folder

The cluster has one simulated GPU node (kwok); the local pod runner (pod_runner.py) runs the real
operator and the real server for the pods placed there, as processes of this machine bound to
the pods' loopback addresses. It runs in a process of its own, in the background, until ``down``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.cluster.local_cluster import LocalCluster, build_binaries
from tests.cluster.pod_runner import LocalPodRunner, wait_until

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "zimage-operator"
EXAMPLE = ROOT / "deploy" / "examples" / "minimal.yaml"
OPERATOR_NAMESPACE = "zimage-system"
NAMESPACE = "default"
TINY = "builtin://tiny"
SELECTOR = "app.kubernetes.io/name=zimage-server,app.kubernetes.io/instance="


def example() -> dict[str, Any]:
    """deploy/examples/minimal.yaml with the built-in tiny model in place of the Hub's."""
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["model"]["source"] = TINY
    return manifest


def _server_urls(cluster: LocalCluster, name: str) -> list[str]:
    """``http://POD_IP:PORT/`` of each server pod (the container port named http)."""
    out = cluster.kubectl("get", "pods", "-n", NAMESPACE, "-l", SELECTOR + name, "-o", "json")
    urls = []
    for pod in json.loads(out.stdout)["items"]:
        address = pod.get("status", {}).get("podIP")
        if not address or pod["metadata"].get("deletionTimestamp"):
            continue
        ports = [p for c in pod["spec"]["containers"] for p in c.get("ports", []) if p.get("name") == "http"]
        urls.append(f"http://{address}:{ports[0]['containerPort']}/")
    return urls


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def up(folder: Path, timeout: float) -> str:
    """Start everything; return the playground's URL."""
    started = time.monotonic()
    cluster = LocalCluster(workdir=folder / "cluster", binaries=build_binaries(), gpu_nodes=1)
    cluster.up()
    try:
        print(f"cluster up in {cluster.started_seconds:.0f}s", flush=True)
        installed = cluster.helm(
            folder, "install", "zimage", str(CHART), "--create-namespace", namespace=OPERATOR_NAMESPACE
        )
        if installed.returncode != 0:
            raise RuntimeError(f"helm install failed: {installed.stderr.strip()}")
        print("chart installed: the operator in zimage-system", flush=True)
        with (folder / "pods.log").open("ab") as log:
            runner = subprocess.Popen(
                [sys.executable, "-m", "tests.cluster.demo", "pods", "--dir", str(folder)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (folder / "pods.pid").write_text(str(runner.pid))
        manifest = example()
        name = manifest["metadata"]["name"]
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump(manifest))
        print(f"applied {EXAMPLE.relative_to(ROOT)} with model.source {TINY}; waiting for Ready", flush=True)
        left = timeout - (time.monotonic() - started)
        wait_until(
            lambda: cluster.condition("zis", name, NAMESPACE) == "True",
            left,
            f"ZImageService {name} to be Ready",
            interval=1,
        )
        (url, *_) = _server_urls(cluster, name)
        # Ready comes from the simulated node; the server process behind it is this one.
        left = timeout - (time.monotonic() - started)
        ready = url + "healthz/ready"
        wait_until(lambda: _answers(ready), left, f"the server at {url} to be ready", interval=1)
    except BaseException:
        for path in sorted(folder.glob("pods*.log")) + sorted(folder.glob("pods/*.log")):
            print(f"--- {path.name}:\n" + path.read_text(errors="replace")[-3000:], file=sys.stderr)
        down(folder)
        raise
    return url


def down(folder: Path, grace: float = 30) -> list[str]:
    """Stop the pod runner (and with it the servers and the operator), then the cluster.
    Returns what was left behind (nothing, normally)."""
    pid_file = folder / "pods.pid"
    if pid_file.is_file():
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):  # reaped, where it is our child
                    os.waitpid(pid, os.WNOHANG)
                os.killpg(pid, 0)  # ProcessLookupError once the group is gone
                time.sleep(0.2)
            os.killpg(pid, signal.SIGKILL)
        pid_file.unlink()
    left: list[str] = []
    workdir = folder / "cluster"
    if (workdir / "state.json").is_file():
        cluster = LocalCluster.from_state(workdir)
        cluster.down()
        left = cluster.leftovers()
    if not left:
        shutil.rmtree(folder, ignore_errors=True)
    return left


def run_pods(folder: Path) -> None:
    """The pod runner for the demo's cluster, until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    kubeconfig = LocalCluster.from_state(folder / "cluster").kubeconfig
    runner = LocalPodRunner(kubeconfig, folder / "pods").start()
    try:
        stop.wait()
    finally:
        runner.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.demo")
    parser.add_argument("command", choices=["up", "down", "pods"])
    parser.add_argument("--dir", default=".demo", help="working folder (cluster, logs)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for everything to be Ready")
    args = parser.parse_args(argv)
    folder = Path(args.dir).resolve()
    if args.command == "pods":
        run_pods(folder)
        return 0
    if args.command == "down":
        left = down(folder)
        if left:
            print("left behind: " + ", ".join(left), file=sys.stderr)
            return 1
        print("demo stopped and removed")
        return 0
    if (folder / "pods.pid").exists() or (folder / "cluster" / "state.json").exists():
        print(f"a demo is already running in {folder}; run `make demo-down` first", file=sys.stderr)
        return 1
    folder.mkdir(parents=True, exist_ok=True)
    url = up(folder, args.timeout)
    print(f"\nThe playground: {url}")
    kubeconfig = LocalCluster.from_state(folder / "cluster").kubeconfig
    print(f"export KUBECONFIG={kubeconfig} PATH={build_binaries()}:$PATH  # kubectl")
    print("Stop and remove everything: make demo-down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
