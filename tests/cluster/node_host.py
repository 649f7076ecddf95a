"""Real kubelet nodes for the local cluster: containerd, runc and a kubelet in a network namespace.

The harness makes the namespace itself (``ip netns add``): it holds only ``lo`` and one bridge,
and has no route out, so the node's and the pods' addresses (from ``NODE_SUBNET``) and the
Service addresses (``SERVICE_CIDR``) exist nowhere else. The control plane runs in the same
namespace; the host reaches the API server through ``relay.py`` on host loopback.

What each node needs here (root, cgroup v1, no CAP_SYS_RESOURCE in containers):
- containerd (Debian's 1.6) with its own root, state, socket and runc root, ``SystemdCgroup =
  false``, ``restrict_oom_score_adj = true`` (else runc fails with "can't get final child's PID
  from pipe"), and a pause image built here (``tools/pause``);
- the CNI bridge and host-local plugins (Debian's containernetworking-plugins);
- a kubelet with ``cgroupDriver: cgroupfs``, its own ``cgroupRoot``, ``failCgroupV1: false`` and
  ``failSwapOn: false``; kube-proxy in iptables mode so that Service addresses work.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NODE_SUBNET = "10.250.0.0/24"
NODE_IP = "10.250.0.1"  # the bridge's address: the kubelet nodes' InternalIP and the pods' gateway
SERVICE_CIDR = "10.251.0.0/16"
KUBERNETES_SERVICE_IP = "10.251.0.1"
BRIDGE = "zbr0"
SOCKET_ROOT = Path("/var/lib/zimage-nodes")
PAUSE_IMAGE = "zimage.local/pause:1"
APT_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack")
CNI_BIN = Path("/usr/lib/cni")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# The controllers the kubelet needs under its cgroup root, where this kernel mounts them (v1).
CGROUP_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer", "blkio", "systemd")


def missing_packages() -> list[str]:
    """The Debian packages a kubelet node needs that are not installed."""
    missing = []
    for package in APT_PACKAGES:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
        )
        if "install ok installed" not in status.stdout:
            missing.append(package)
    return missing


class NetworkNamespace:
    """A network namespace with ``lo`` and one bridge carrying ``NODE_IP``; nothing routes out."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def path(self) -> Path:
        return Path("/run/netns") / self.name

    def exec_args(self, args: list[str]) -> list[str]:
        # nsenter joins the network namespace only. (`ip netns exec` also makes a mount namespace
        # with a fresh /sys, which hides the cgroup mounts from the kubelet and the runtime's
        # mounts from the teardown.)
        return ["nsenter", f"--net={self.path}", "--", *args]

    def create(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        prefix = NODE_SUBNET.split("/")[1]
        for command in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", BRIDGE, "type", "bridge"],
            ["ip", "addr", "add", f"{NODE_IP}/{prefix}", "dev", BRIDGE],
            ["ip", "link", "set", BRIDGE, "up"],
            # Service addresses onto the bridge, where kube-proxy's rules turn them into pods'
            # (a relay reaches a ClusterIP from the namespace itself); nothing answers there else.
            ["ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE],
            ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
        ):
            subprocess.run(self.exec_args(command), check=True, capture_output=True)

    def routes(self) -> list[str]:
        out = subprocess.run(
            self.exec_args(["ip", "-o", "route", "show", "table", "all"]), capture_output=True, text=True
        )
        return out.stdout.splitlines()

    def delete(self) -> None:
        if self.path.exists():
            subprocess.run(["ip", "netns", "delete", self.name], check=False, capture_output=True)


@dataclass
class KubeletNode:
    """One kubelet node's files under ``workdir/nodes/<name>``."""

    name: str
    workdir: Path
    cgroup_root: str  # e.g. "/zimage-1a2b3c"

    @property
    def containerd_dir(self) -> Path:
        return self.workdir / "containerd"

    @property
    def socket_dir(self) -> Path:
        """containerd's sockets and the kubelet's folder (which holds sockets too): a short path,
        since a socket's path is at most 104 bytes."""
        return SOCKET_ROOT / self.cgroup_root.strip("/")

    @property
    def socket(self) -> Path:
        return self.socket_dir / "containerd.sock"

    @property
    def kubelet_dir(self) -> Path:
        return self.socket_dir / "kubelet"

    def write_containerd_config(self) -> Path:
        root = self.containerd_dir
        cri = {
            "sandbox_image": PAUSE_IMAGE,
            "restrict_oom_score_adj": True,
            "disable_apparmor": True,
            "enable_selinux": False,
            "containerd": {
                "snapshotter": "overlayfs",
                "default_runtime_name": "runc",
                "runtimes": {
                    "runc": {
                        "runtime_type": "io.containerd.runc.v2",
                        "options": {"SystemdCgroup": False, "Root": str(root / "runc")},
                    }
                },
            },
            "cni": {"bin_dir": str(CNI_BIN), "conf_dir": str(self.workdir / "cni")},
        }
        config = {
            "version": 2,
            "root": str(root / "root"),
            "state": str(root / "state"),
            "grpc": {"address": str(self.socket)},
            "ttrpc": {"address": str(self.socket_dir / "containerd.ttrpc.sock")},
            "disabled_plugins": [
                "io.containerd.snapshotter.v1.btrfs",
                "io.containerd.snapshotter.v1.zfs",
                "io.containerd.snapshotter.v1.devmapper",
                "io.containerd.snapshotter.v1.aufs",
                "io.containerd.tracing.processor.v1.otlp",
            ],
            "plugins": {
                "io.containerd.grpc.v1.cri": cri,
                "io.containerd.internal.v1.opt": {"path": str(root / "opt")},
            },
        }
        root.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        path = root / "config.toml"
        path.write_text(_toml(config))
        return path

    def write_cni_config(self) -> None:
        folder = self.workdir / "cni"
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "cniVersion": "0.4.0",
            "name": "zimage",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": NODE_SUBNET, "gateway": NODE_IP}]],
                        # Pods route everything through the bridge: Service addresses reach
                        # kube-proxy's rules; the namespace itself has no route further.
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.workdir / "cni-ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (folder / "10-zimage.conflist").write_text(json.dumps(config, indent=2))

    def write_kubelet_config(self, ports: dict[str, int]) -> Path:
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": ports["kubelet"],
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": ports["kubelet_healthz"],
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "cgroupsPerQOS": True,
            "enforceNodeAllocatable": ["pods"],
            "failCgroupV1": False,
            "failSwapOn": False,
            # Inside the namespace only: the API server reaches the kubelet for logs and exec.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "resolvConf": "",
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "localStorageCapacityIsolation": False,
            "maxPods": 30,
            "nodeStatusUpdateFrequency": "4s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "registerNode": True,
            "shutdownGracePeriod": "0s",
            "podLogsDir": str(self.workdir / "pod-logs"),  # not /var/log/pods: nothing outside
        }
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "kubelet-config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def kubelet_args(self, binary: str, kubeconfig: Path, config: Path) -> list[str]:
        return [
            binary,
            f"--config={config}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={self.kubelet_dir}",
            f"--cert-dir={self.workdir / 'kubelet-pki'}",
            f"--hostname-override={self.name}",
            f"--node-ip={NODE_IP}",
            "--node-labels=type=kubelet,zimage.dev/node-kind=kubelet",
            "--v=1",
        ]

    def write_kube_proxy_config(self, kubeconfig: Path, ports: dict[str, int], pod_cidr: str) -> Path:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "hostnameOverride": self.name,
            "bindAddress": "127.0.0.1",
            "healthzBindAddress": f"127.0.0.1:{ports['proxy_healthz']}",
            "metricsBindAddress": f"127.0.0.1:{ports['proxy_metrics']}",
            "clusterCIDR": pod_cidr,
            # No sysctl writes outside the namespace's own: leave conntrack's limits as they are.
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
            "iptables": {"masqueradeAll": False, "syncPeriod": "5s", "minSyncPeriod": "0s"},
        }
        path = self.workdir / "kube-proxy-config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    # -- cgroups -----------------------------------------------------------------------------

    def create_cgroups(self) -> None:
        for controller in CGROUP_CONTROLLERS:
            base = CGROUP_ROOT / controller
            if base.is_dir():
                (base / self.cgroup_root.lstrip("/")).mkdir(exist_ok=True)
        # cpuset children start empty; the kubelet's root needs the parent's CPUs and memory nodes.
        cpuset = CGROUP_ROOT / "cpuset" / self.cgroup_root.lstrip("/")
        if cpuset.is_dir():
            for name in ("cpuset.cpus", "cpuset.mems"):
                (cpuset / name).write_text((CGROUP_ROOT / "cpuset" / name).read_text())

    def cgroup_folders(self) -> list[Path]:
        found = []
        for controller in CGROUP_CONTROLLERS:
            folder = CGROUP_ROOT / controller / self.cgroup_root.lstrip("/")
            if folder.is_dir():
                found.append(folder)
        return found

    def kill_cgroup_tasks(self) -> None:
        for top in self.cgroup_folders():
            for folder in [top, *(p for p in top.rglob("*") if p.is_dir())]:
                _kill_tasks(folder)

    def remove_cgroups(self, timeout: float = 20) -> None:
        """Remove the node's cgroup folders, deepest first (a folder goes once its tasks exit)."""
        deadline = time.monotonic() + timeout
        for top in self.cgroup_folders():
            folders = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for folder in [*folders, top]:
                while True:
                    try:
                        folder.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise
                        _kill_tasks(folder)
                        time.sleep(0.1)


def _kill_tasks(folder: Path) -> None:
    with contextlib.suppress(OSError):
        for line in (folder / "tasks").read_text().split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(line), signal.SIGKILL)


def _toml(config: dict[str, Any]) -> str:
    """A TOML document for containerd's config: tables of strings, booleans, numbers and lists."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(item) for item in v) + "]"
        raise TypeError(f"no TOML form for {v!r}")

    def table(path: list[str], body: dict[str, Any]) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in body.items() if isinstance(v, dict)}
        if path:
            lines.append("[" + ".".join(json.dumps(p) if "." in p else p for p in path) + "]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in tables.items():
            table([*path, k], v)

    table([], config)
    return "\n".join(lines)


def pause_image_archive(pause_binary: Path, out: Path) -> Path:
    """A docker-archive tar of the pause image (one layer holding ``/pause``), for ``ctr import``."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("pause")
        data = pause_binary.read_bytes()
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "tests/cluster/tools/pause"}],
    }
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [PAUSE_IMAGE], "Layers": ["layer.tar"]}]
    with tarfile.open(out, "w") as tar:
        for name, blob in (
            ("layer.tar", layer_bytes),
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(blob), 0
            tar.addfile(info, io.BytesIO(blob))
    return out


RUNTIME_DIRS = (Path("/run/containerd/s"), Path("/run/containerd"), SOCKET_ROOT)


def remove_runtime_dirs() -> None:
    """containerd's shims keep their sockets in /run/containerd/s whatever the state folder; each
    shim removes its own when it exits. Remove the folders once empty (another cluster's shims
    may still use them)."""
    for folder in RUNTIME_DIRS:
        with contextlib.suppress(OSError):
            folder.rmdir()


def mounts_under(*prefixes: str) -> list[str]:
    """Mount points (from this mount namespace's table) under any of ``prefixes``, deepest first."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in prefixes):
            points.append(point)
    return sorted(set(points), key=lambda p: -len(p))


def unmount_all(*prefixes: str) -> None:
    for _ in range(5):
        points = mounts_under(*prefixes)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def remove_tree(path: Path) -> None:
    """Remove a node's files once nothing is mounted under them."""
    unmount_all(str(path))
    shutil.rmtree(path, ignore_errors=True)


def pause_pod(name: str, namespace: str = "default", **container: Any) -> dict[str, Any]:
    """A pod for the kubelet node running the pause image (``container`` adds probes, say)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeSelector": {"zimage.dev/node-kind": "kubelet"},
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "main", "image": PAUSE_IMAGE, "imagePullPolicy": "Never", **container}],
        },
    }
