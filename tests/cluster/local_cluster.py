"""A real Kubernetes control plane on loopback, for tests and demos.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as child processes,
built from Go modules by ``build-binaries.sh``. kwok simulates GPU nodes and gives their pods
addresses in 127.128.0.0/16; Service ClusterIPs come from 127.96.0.0/16. Every address the
cluster hands out is on loopback, so nothing a test does can reach another machine.

    python -m tests.cluster.local_cluster up [--dir .cluster]     # start, write state, return
    python -m tests.cluster.local_cluster down [--dir .cluster]   # stop every process by PID
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from zimage_server.processes import free_port

from .certs import Pki, make_pki

HERE = Path(__file__).resolve().parent
POD_CIDR = "127.128.0.0/16"
SERVICE_CIDR = "127.96.0.0/16"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"


def build_binaries() -> Path:
    """Build (or find in the cache) the cluster's programs; return their folder."""
    out = subprocess.run(
        ["bash", str(HERE / "build-binaries.sh")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def node_pod_cidr(index: int) -> str:
    network = ipaddress.ip_network(POD_CIDR)
    return str(list(network.subnets(new_prefix=24))[index])


@dataclass
class Component:
    name: str
    pid: int
    log: Path


@dataclass
class LocalCluster:
    workdir: Path
    binaries: Path
    gpu_nodes: int = 2
    gpus_per_node: int = 8
    components: list[Component] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    started_seconds: float = 0.0
    _pki: Pki | None = field(default=None, repr=False)

    # -- paths -----------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def state_file(self) -> Path:
        return self.workdir / "state.json"

    def binary(self, name: str) -> str:
        return str(self.binaries / name)

    # -- lifecycle -------------------------------------------------------------------------

    def up(self, timeout: float = 120) -> None:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ports = {
            name: free_port() for name in ("etcd", "etcd_peer", "apiserver", "kcm", "scheduler", "kwok")
        }
        pki = self._pki = make_pki(self.workdir / "pki")
        self._write_kubeconfig(pki)
        try:
            self._start_etcd()
            self._wait_http(f"http://127.0.0.1:{self.ports['etcd']}/health", timeout, "etcd")
            self._start_apiserver(pki)
            self._wait_apiserver(pki, timeout)
            self._start_controller_manager(pki)
            self._start_scheduler()
            self._start_kwok()
            self._write_state()
            self._create_gpu_nodes()
            self._wait_ready(timeout - (time.monotonic() - started))
        except BaseException:
            self.down()
            raise
        self.started_seconds = time.monotonic() - started

    def down(self, grace: float = 10) -> None:
        """Stop every component by PID (its whole process group), newest first."""
        for component in reversed(self.components):
            _stop_group(component.pid, grace)
        self.components = []
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()

    def restart_apiserver(self, down_seconds: float, timeout: float = 60) -> None:
        """An API server outage: stop it, wait ``down_seconds``, start it again on the same port
        and etcd, and return once it answers."""
        assert self._pki is not None, "the cluster is not up"
        (component,) = [c for c in self.components if c.name == "kube-apiserver"]
        _stop_group(component.pid, grace=10)
        self.components.remove(component)
        time.sleep(down_seconds)
        self._start_apiserver(self._pki)
        self._wait_apiserver(self._pki, timeout)

    @property
    def pids(self) -> list[int]:
        return [component.pid for component in self.components]

    # -- components ------------------------------------------------------------------------

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(args),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,  # its own process group, so down() stops its children too
            )
        self.components.append(Component(name, proc.pid, log))
        self._write_state()

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd_peer']}"
        self._spawn(
            "etcd",
            [
                self.binary("etcd"),
                "--name=local",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=local={peer}",
                "--listen-metrics-urls=",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )

    def _start_apiserver(self, pki: Pki) -> None:
        self._spawn(
            "kube-apiserver",
            [
                self.binary("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--service-account-issuer=https://127.0.0.1:{self.ports['apiserver']}",
                f"--service-account-key-file={pki.sa_public}",
                f"--service-account-signing-key-file={pki.sa_private}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                "--v=1",
            ],
        )

    def _start_controller_manager(self, pki: Pki) -> None:
        self._spawn(
            "kube-controller-manager",
            [
                self.binary("kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['kcm']}",
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                "--leader-elect=false",
                f"--service-account-private-key-file={pki.sa_private}",
                f"--root-ca-file={pki.ca_cert}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--controllers=*",
                "--v=1",
            ],
        )

    def _start_scheduler(self) -> None:
        self._spawn(
            "kube-scheduler",
            [
                self.binary("kube-scheduler"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports['scheduler']}",
                "--leader-elect=false",
                "--v=1",
            ],
        )

    def _start_kwok(self) -> None:
        self._spawn(
            "kwok",
            [
                self.binary("kwok"),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={HERE / 'kwok-stages.yaml'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                f"--cidr={POD_CIDR}",
                "--node-ip=127.0.0.1",
                f"--server-address=127.0.0.1:{self.ports['kwok']}",
                "--node-lease-duration-seconds=40",
            ],
        )

    # -- setup -----------------------------------------------------------------------------

    def _write_kubeconfig(self, pki: Pki) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "local",
                    "cluster": {"server": self.server, "certificate-authority": str(pki.ca_cert)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)},
                }
            ],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
            "current-context": "local",
        }
        self.kubeconfig.write_text(yaml.safe_dump(config))
        self.kubeconfig.chmod(0o600)

    def _write_state(self) -> None:
        state = {
            "kubeconfig": str(self.kubeconfig),
            "server": self.server,
            "binaries": str(self.binaries),
            "ports": self.ports,
            "components": [{"name": c.name, "pid": c.pid, "log": str(c.log)} for c in self.components],
        }
        self.state_file.write_text(json.dumps(state, indent=2))

    @classmethod
    def from_state(cls, workdir: Path) -> LocalCluster:
        state = json.loads((workdir / "state.json").read_text())
        cluster = cls(workdir=workdir, binaries=Path(state["binaries"]))
        cluster.ports = state["ports"]
        cluster.components = [Component(c["name"], c["pid"], Path(c["log"])) for c in state["components"]]
        return cluster

    def node_manifest(self, index: int) -> dict[str, Any]:
        name = f"gpu-node-{index}"
        resources = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(self.gpus_per_node)}
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    "nvidia.com/gpu.present": "true",
                    "nvidia.com/gpu.product": GPU_PRODUCT,
                    "nvidia.com/gpu.count": str(self.gpus_per_node),
                },
            },
            # Each node has its own slice of the pod CIDR (kwok hands out pod IPs from it) and
            # its own loopback address.
            "spec": {"podCIDR": node_pod_cidr(index), "podCIDRs": [node_pod_cidr(index)]},
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "addresses": [
                    {"type": "InternalIP", "address": f"127.64.0.{index + 1}"},
                    {"type": "Hostname", "address": name},
                ],
            },
        }

    def _create_gpu_nodes(self) -> None:
        self.add_gpu_nodes(range(self.gpu_nodes))

    def add_gpu_nodes(self, indexes: range) -> list[str]:
        """Create simulated GPU nodes ``gpu-node-<index>``; kwok makes them Ready."""
        docs = [self.node_manifest(i) for i in indexes]
        self.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(docs))
        return [doc["metadata"]["name"] for doc in docs]

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def helm(
        self, home: Path, *args: str, namespace: str | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """helm from the cache against this cluster, with its own HOME (caches stay there)."""
        command = [self.binary("helm"), f"--kubeconfig={self.kubeconfig}"]
        if namespace is not None:
            command += ["-n", namespace]
        env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
        return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=timeout)

    # -- waiting ---------------------------------------------------------------------------

    def _check_alive(self) -> None:
        for component in self.components:
            if not _alive(component.pid):
                tail = component.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{component.name} exited during start-up; the end of its log:\n{tail}")

    def _wait_http(self, url: str, timeout: float, what: str, **client: Any) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2, **client) as http:
            while True:
                self._check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(url).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f}s")
                time.sleep(0.1)

    def _wait_apiserver(self, pki: Pki, timeout: float) -> None:
        tls = ssl.create_default_context(cafile=str(pki.ca_cert))
        tls.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        self._wait_http(f"{self.server}/readyz", timeout, "kube-apiserver", verify=tls)

    def _wait_ready(self, timeout: float) -> None:
        """Nodes Ready and the default ServiceAccount made (so pods can be created)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            nodes = self.kubectl("get", "nodes", "-o", "json", check=False)
            sa = self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False)
            if nodes.returncode == 0 and sa.returncode == 0:
                items = json.loads(nodes.stdout)["items"]
                ready = [n for n in items if _condition(n, "Ready") == "True"]
                if len(ready) == self.gpu_nodes:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("the simulated nodes did not become Ready")
            time.sleep(0.2)


def _condition(obj: dict[str, Any], kind: str) -> str | None:
    for condition in obj.get("status", {}).get("conditions", []) or []:
        if condition.get("type") == kind:
            return str(condition.get("status"))
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; reap it if it is our child.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return Path(f"/proc/{pid}").exists() and _proc_state(pid) != "Z"


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "X"


def _stop_group(pid: int, grace: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def processes_under(marker: str) -> list[int]:
    """PIDs of live processes whose command line mentions ``marker`` (a folder, say)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and int(entry.name) != os.getpid() and _proc_state(int(entry.name)) != "Z":
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def running_cluster(workdir: Path, **options: Any) -> Iterator[LocalCluster]:
    cluster = LocalCluster(workdir=workdir, binaries=build_binaries(), **options)
    cluster.up()
    try:
        yield cluster
    finally:
        cluster.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.local_cluster")
    parser.add_argument("command", choices=["up", "down", "build"])
    parser.add_argument("--dir", default=".cluster", help="working folder (certificates, logs, state)")
    args = parser.parse_args(argv)
    workdir = Path(args.dir).resolve()
    if args.command == "build":
        print(build_binaries())
        return 0
    if args.command == "down":
        if not (workdir / "state.json").is_file():
            print(f"no cluster state in {workdir}")
            return 0
        LocalCluster.from_state(workdir).down()
        print("stopped")
        return 0
    if (workdir / "state.json").is_file():
        print(f"a cluster is already recorded in {workdir}; run `down` first", file=sys.stderr)
        return 1
    cluster = LocalCluster(workdir=workdir, binaries=build_binaries())
    cluster.up()
    print(f"cluster up in {cluster.started_seconds:.1f}s: {cluster.server}")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    print(f"export PATH={cluster.binaries}:$PATH   # kubectl, helm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
