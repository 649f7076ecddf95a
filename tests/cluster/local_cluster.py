"""A real Kubernetes control plane on loopback, for tests and demos.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok run as child processes,
built from Go modules by ``build-binaries.sh``. kwok simulates GPU nodes and gives their pods
addresses in a /16 of 127.128.0.0/10 that the cluster claims (so that clusters side by side
differ); Service ClusterIPs come from 127.96.0.0/16. Every address the
cluster hands out is on loopback, so nothing a test does can reach another machine.

With ``kubelet_nodes=1`` the cluster also has a real node (``node_host.py``: containerd, runc, a
kubelet and kube-proxy). Then the whole cluster runs inside a network namespace of its own, the
only place where the node's, the pods' and the Services' addresses exist, and the API server is
reached from the host through a relay on host loopback, on the same port.

    python -m tests.cluster.local_cluster up [--dir .cluster]     # start, write state, return
    python -m tests.cluster.local_cluster down [--dir .cluster]   # stop every process by PID
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
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

from zimage_server.core.processes import free_port, free_ports

from . import node_host
from .certs import Pki, make_pki

HERE = Path(__file__).resolve().parent
POD_CIDRS = "127.128.0.0/10"  # each running cluster claims one /16 of it, so clusters side by side
SERVICE_CIDR = "127.96.0.0/16"  # differ in the addresses their simulated pods listen on
CLAIMS = Path("/tmp/zimage-local-clusters")
STALE_CLAIM_SECONDS = 600
IMAGE_HEADROOM_BYTES = 2 * 10**9  # beyond an image's unpacked size: logs, the pause image, writes
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"


def build_binaries() -> Path:
    """Build (or find in the cache) the cluster's programs; return their folder."""
    out = subprocess.run(
        ["bash", str(HERE / "build-binaries.sh")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def node_pod_cidr(pod_cidr: str, index: int) -> str:
    network = ipaddress.ip_network(pod_cidr)
    return str(list(network.subnets(new_prefix=24))[index])


def claim_pod_cidr(workdir: Path) -> str:
    """Claim a /16 of ``POD_CIDRS`` for the cluster in ``workdir`` (a file per /16, made with
    O_EXCL; a claim whose cluster has gone is taken over)."""
    CLAIMS.mkdir(parents=True, exist_ok=True)
    for index, network in enumerate(ipaddress.ip_network(POD_CIDRS).subnets(new_prefix=16)):
        claim = CLAIMS / f"pod-cidr-{index}"
        for _ in range(2):
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not _claim_is_stale(claim, workdir):
                    break
                with contextlib.suppress(FileNotFoundError):
                    claim.unlink()
                continue
            with os.fdopen(fd, "w") as out:
                out.write(str(workdir))
            return str(network)
    raise RuntimeError(f"every /16 of {POD_CIDRS} is claimed by a running local cluster (see {CLAIMS})")


def _claim_is_stale(claim: Path, workdir: Path) -> bool:
    try:
        owner = Path(claim.read_text())
        age = time.time() - claim.stat().st_mtime
    except (FileNotFoundError, ValueError):
        return True
    if owner == workdir or not owner.is_dir():
        return True
    return not (owner / "state.json").exists() and age > STALE_CLAIM_SECONDS


def release_pod_cidr(workdir: Path) -> None:
    for claim in CLAIMS.glob("pod-cidr-*"):
        with contextlib.suppress(OSError):
            if Path(claim.read_text()) == workdir:
                claim.unlink()


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
    kubelet_nodes: int = 0
    pod_cidr: str = ""  # claimed by up()
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

    @property
    def _id(self) -> str:
        """A short name for this cluster's folder: its namespace and cgroup roots carry it."""
        return hashlib.sha1(str(self.workdir).encode()).hexdigest()[:10]

    @property
    def netns(self) -> node_host.NetworkNamespace | None:
        """The cluster's network namespace (only when it has kubelet nodes)."""
        if not self.kubelet_nodes:
            return None
        return node_host.NetworkNamespace(f"zimage-{self._id}")

    @property
    def service_cidr(self) -> str:
        return node_host.SERVICE_CIDR if self.kubelet_nodes else SERVICE_CIDR

    @property
    def kubelet_node_names(self) -> list[str]:
        return [f"node-{i}" for i in range(self.kubelet_nodes)]

    def kubelet_node(self, name: str) -> node_host.KubeletNode:
        return node_host.KubeletNode(name, self.workdir / "nodes" / name, f"/zimage-{self._id}-{name}")

    # -- lifecycle -------------------------------------------------------------------------

    def up(self, timeout: float = 120) -> None:
        started = time.monotonic()
        if self.kubelet_nodes > 1:
            raise ValueError("one kubelet node per cluster: its namespace has one bridge and one node IP")
        if self.kubelet_nodes and (missing := node_host.missing_packages()):
            raise RuntimeError(
                f"a kubelet node needs the Debian packages {' '.join(missing)}: apt-get install them"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.kubelet_nodes:
            reclaim_abandoned_nodes(self.workdir)
        self.pod_cidr = claim_pod_cidr(self.workdir)
        names = ["etcd", "etcd_peer", "apiserver", "kcm", "scheduler", "kwok"]
        if self.kubelet_nodes:
            names += ["kubelet", "kubelet_healthz", "proxy_healthz", "proxy_metrics"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        extra_ips = [node_host.NODE_IP, node_host.KUBERNETES_SERVICE_IP] if self.kubelet_nodes else []
        pki = self._pki = make_pki(self.workdir / "pki", extra_ips=extra_ips)
        self._write_kubeconfig(pki)
        try:
            if self.netns is not None:
                self.netns.create()
                self._start_relay(
                    "apiserver-relay", self.ports["apiserver"], f"127.0.0.1:{self.ports['apiserver']}"
                )
            self._start_etcd()
            if self.netns is None:  # else etcd is not reachable from here: the API server waits for it
                self._wait_http(f"http://127.0.0.1:{self.ports['etcd']}/health", timeout, "etcd")
            self._start_apiserver(pki)
            self._wait_apiserver(pki, timeout)
            self._start_controller_manager(pki)
            self._start_scheduler()
            self._start_kwok()
            self._write_state()
            self._create_gpu_nodes()
            for name in self.kubelet_node_names:
                self._start_kubelet_node(name, timeout)
            self._wait_ready(timeout - (time.monotonic() - started))
        except BaseException:
            self.down()
            raise
        self.started_seconds = time.monotonic() - started

    def down(self, grace: float = 10) -> None:
        """Stop every component by PID (its whole process group), newest first. A kubelet node
        goes first: its pods' sandboxes, its containers' processes, mounts and cgroups."""
        for name in self.kubelet_node_names:
            self._stop_kubelet_node(name, grace)
        for component in reversed(self.components):
            _stop_group(component.pid, grace)
        self.components = []
        if self.netns is not None:
            self.netns.delete()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        release_pod_cidr(self.workdir)

    def leftovers(self) -> list[str]:
        """What a stopped cluster left behind: processes, mounts, cgroups, its network namespace.
        Empty after ``down()``."""
        found = [f"process {pid}" for pid in processes_under(str(self.workdir))]
        found += [f"mount {point}" for point in node_host.mounts_under(str(self.workdir))]
        for name in self.kubelet_node_names:
            node = self.kubelet_node(name)
            found += [f"cgroup {folder}" for folder in node.cgroup_folders()]
            found += [f"folder {node.socket_dir}"] if node.socket_dir.exists() else []
            found += [f"process {pid}" for pid in processes_under(str(node.socket_dir))]
            found += [f"mount {point}" for point in node_host.mounts_under(str(node.socket_dir))]
        if self.netns is not None and self.netns.path.exists():
            found.append(f"network namespace {self.netns.name}")
        return found

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

    def _spawn(self, name: str, args: Sequence[str], pass_fds: Sequence[int] = ()) -> None:
        """Start a component; in the cluster's network namespace when it has one."""
        log = self.workdir / f"{name}.log"
        command = list(args) if self.netns is None else self.netns.exec_args(list(args))
        with log.open("ab") as out:
            proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                pass_fds=pass_fds,
                start_new_session=True,  # its own process group, so down() stops its children too
            )
        self.components.append(Component(name, proc.pid, log))
        self._write_state()

    def _start_relay(self, name: str, host_port: int, target: str) -> None:
        """Listen on host loopback ``host_port``; dial ``target`` inside the namespace."""
        listener = socket.create_server(("127.0.0.1", host_port), backlog=128)
        try:
            self._spawn(
                name,
                [sys.executable, str(HERE / "relay.py"), "--fd", str(listener.fileno()), "--target", target],
                pass_fds=[listener.fileno()],
            )
        finally:
            listener.close()

    def relay(self, name: str, target: str) -> int:
        """A relay from a new port on host loopback to ``target`` (a Service's ClusterIP:port,
        say) inside the cluster's namespace; returns the port. It stops with the cluster."""
        if self.netns is None:
            raise RuntimeError("a cluster without kubelet nodes has no network namespace to relay into")
        port = free_port()
        self._start_relay(f"relay-{name}", port, target)
        self._wait_tcp(port, 10)
        return port

    def _wait_tcp(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")
            time.sleep(0.05)

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
                # With kubelet nodes, inside the namespace: pods reach it at the node's address.
                f"--bind-address={'0.0.0.0' if self.kubelet_nodes else '127.0.0.1'}",
                f"--advertise-address={node_host.NODE_IP if self.kubelet_nodes else '127.0.0.1'}",
                f"--secure-port={self.ports['apiserver']}",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                f"--service-account-issuer=https://127.0.0.1:{self.ports['apiserver']}",
                f"--service-account-key-file={pki.sa_public}",
                f"--service-account-signing-key-file={pki.sa_private}",
                f"--service-cluster-ip-range={self.service_cidr}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--enable-priority-and-fairness=false",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                # Reach kubelets by address: a node name would go to the host's DNS server.
                "--kubelet-preferred-address-types=InternalIP",
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
                f"--service-cluster-ip-range={self.service_cidr}",
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
                f"--cidr={self.pod_cidr}",
                "--node-ip=127.0.0.1",
                f"--server-address=127.0.0.1:{self.ports['kwok']}",
                "--node-lease-duration-seconds=40",
            ],
        )

    # -- kubelet nodes ---------------------------------------------------------------------

    def ctr(self, node: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """containerd's ``ctr`` against a kubelet node's containerd, in the images' namespace."""
        sock = self.kubelet_node(node).socket
        return subprocess.run(
            ["ctr", f"--address={sock}", "--namespace=k8s.io", *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        )

    def crictl(self, node: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        endpoint = f"unix://{self.kubelet_node(node).socket}"
        return subprocess.run(
            [self.binary("crictl"), f"--runtime-endpoint={endpoint}", f"--image-endpoint={endpoint}", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )

    def import_image(self, node: str, archive: Path) -> None:
        """Load a docker-archive or OCI tar into a kubelet node's containerd (no registry here).

        The node keeps the archive's layers and unpacks them when a pod starts: about three
        times the archive's size. Too little room is said here, not as a pod that never starts."""
        root = self.kubelet_node(node).containerd_dir
        need = 3 * archive.stat().st_size + IMAGE_HEADROOM_BYTES
        free = shutil.disk_usage(root).free
        if free < need:
            raise RuntimeError(
                f"{free / 1e9:.1f} GB free under {root}, and loading {archive.name} on node {node} "
                f"needs {need / 1e9:.1f} GB: free space on that file system (a killed run's pytest "
                "folders, old clones) and run again"
            )
        self.ctr(node, "images", "import", "--no-unpack", str(archive))

    def _start_kubelet_node(self, name: str, timeout: float) -> None:
        node = self.kubelet_node(name)
        node.write_cni_config()
        containerd_config = node.write_containerd_config()
        node.create_cgroups()
        self._spawn(f"containerd-{name}", ["containerd", f"--config={containerd_config}"])
        deadline = time.monotonic() + timeout
        while subprocess.run(["ctr", f"--address={node.socket}", "version"], capture_output=True).returncode:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"containerd of {name} did not answer on {node.socket}")
            time.sleep(0.1)
        archive = node_host.pause_image_archive(self.binaries / "pause", node.workdir / "pause.tar")
        self.import_image(name, archive)
        kubelet_config = node.write_kubelet_config(self.ports)
        self._spawn(
            f"kubelet-{name}", node.kubelet_args(self.binary("kubelet"), self.kubeconfig, kubelet_config)
        )
        proxy_config = node.write_kube_proxy_config(self.kubeconfig, self.ports, node_host.NODE_SUBNET)
        self._spawn(f"kube-proxy-{name}", [self.binary("kube-proxy"), f"--config={proxy_config}", "--v=1"])
        while self.kubectl("get", "node", name, check=False).returncode:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the kubelet of {name} did not register its node")
            time.sleep(0.2)
        # GPUs as a node-level extended resource: patched into the status' capacity, the
        # documented way; the kubelet keeps it and mirrors it into allocatable.
        gpu = {"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": str(self.gpus_per_node)}
        self.kubectl("patch", "node", name, "--subresource=status", "--type=json", "-p", json.dumps([gpu]))
        self.kubectl(
            "label",
            "node",
            name,
            "nvidia.com/gpu.present=true",
            f"nvidia.com/gpu.product={GPU_PRODUCT}",
            f"nvidia.com/gpu.count={self.gpus_per_node}",
        )
        while True:
            allocatable = json.loads(self.kubectl("get", "node", name, "-o", "json").stdout)["status"][
                "allocatable"
            ]
            if allocatable.get("nvidia.com/gpu") == str(self.gpus_per_node):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the kubelet of {name} did not take up the node's GPUs")
            time.sleep(0.2)

    def _stop_kubelet_node(self, name: str, grace: float) -> None:
        node = self.kubelet_node(name)
        for component in [c for c in self.components if c.name in (f"kubelet-{name}", f"kube-proxy-{name}")]:
            _stop_group(component.pid, grace)
            self.components.remove(component)
        containerd = [c for c in self.components if c.name == f"containerd-{name}"]
        if containerd and _alive(containerd[0].pid):
            # Each pod's sandbox: its containers stopped, its network (CNI) and namespace removed.
            self.crictl(name, "rmp", "--all", "--force")
        for component in containerd:
            _stop_group(component.pid, grace)
            self.components.remove(component)
        # What outlives containerd by design: the shims and their containers' processes.
        node.kill_cgroup_tasks()
        for pid in processes_under(str(node.workdir)) + processes_under(str(node.socket_dir)):
            _kill(pid)
        node_host.unmount_all(str(node.workdir), str(node.socket_dir))
        node.remove_cgroups()
        shutil.rmtree(node.socket_dir, ignore_errors=True)
        # The images' content and unpacked layers: about 10 GB with the server image, in a
        # folder pytest would keep for three sessions.
        shutil.rmtree(node.containerd_dir / "root", ignore_errors=True)
        node_host.remove_runtime_dirs()

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
            "pod_cidr": self.pod_cidr,
            "kubelet_nodes": self.kubelet_nodes,
            "components": [{"name": c.name, "pid": c.pid, "log": str(c.log)} for c in self.components],
        }
        self.state_file.write_text(json.dumps(state, indent=2))

    @classmethod
    def from_state(cls, workdir: Path) -> LocalCluster:
        state = json.loads((workdir / "state.json").read_text())
        cluster = cls(
            workdir=workdir, binaries=Path(state["binaries"]), kubelet_nodes=state.get("kubelet_nodes", 0)
        )
        cluster.ports = state["ports"]
        cluster.pod_cidr = state["pod_cidr"]
        cluster.components = [Component(c["name"], c["pid"], Path(c["log"])) for c in state["components"]]
        return cluster

    def node_manifest(self, index: int) -> dict[str, Any]:
        name = f"gpu-node-{index}"
        pod_cidr = node_pod_cidr(self.pod_cidr, index)
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
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "addresses": [
                    {"type": "InternalIP", "address": f"127.64.{self.pod_cidr.split('.')[1]}.{index + 1}"},
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

    def condition(self, kind: str, name: str, namespace: str, condition: str = "Ready") -> str | None:
        """The status (``"True"``, ...) of a resource's condition; None where it or the condition
        does not exist."""
        out = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        return _condition(json.loads(out.stdout), condition) if out.returncode == 0 else None

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
                if len(ready) == self.gpu_nodes + self.kubelet_nodes:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("the nodes did not become Ready")
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


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
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


def reclaim_abandoned_nodes(workdir: Path) -> list[Path]:
    """Remove the image stores of kubelet nodes whose cluster was killed before its teardown
    (pytest keeps its last sessions' folders, and such a node holds about 10 GB with the server
    image); return what was removed. Only pytest's folders are searched, and a node with a live
    process or a mount under its folder is left alone."""
    base = workdir.resolve().parent.parent
    if not base.name.startswith("pytest-of-"):
        return []
    removed = []
    for root in base.glob("pytest-*/*/nodes/*/containerd/root"):
        node = root.parents[1]
        if node.is_relative_to(workdir.resolve()) or processes_under(str(node)):
            continue
        if node_host.mounts_under(str(node)):
            continue
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed


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
    parser.add_argument("--gpu-nodes", type=int, default=2, help="simulated (kwok) GPU nodes")
    parser.add_argument(
        "--kubelet-nodes", type=int, choices=[0, 1], default=1, help="real kubelet nodes (containerd, runc)"
    )
    args = parser.parse_args(argv)
    workdir = Path(args.dir).resolve()
    if args.command == "build":
        print(build_binaries())
        return 0
    if args.command == "down":
        if not (workdir / "state.json").is_file():
            print(f"no cluster state in {workdir}")
            return 0
        cluster = LocalCluster.from_state(workdir)
        cluster.down()
        if left := cluster.leftovers():
            print("left behind: " + ", ".join(left), file=sys.stderr)
            return 1
        print("stopped")
        return 0
    if (workdir / "state.json").is_file():
        print(f"a cluster is already recorded in {workdir}; run `down` first", file=sys.stderr)
        return 1
    cluster = LocalCluster(
        workdir=workdir, binaries=build_binaries(), gpu_nodes=args.gpu_nodes, kubelet_nodes=args.kubelet_nodes
    )
    cluster.up()
    print(f"cluster up in {cluster.started_seconds:.1f}s: {cluster.server}")
    if cluster.netns is not None:
        print(
            f"network namespace {cluster.netns.name}: "
            f"nsenter --net={cluster.netns.path} reaches pods and Services"
        )
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    print(f"export PATH={cluster.binaries}:$PATH   # kubectl, helm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
