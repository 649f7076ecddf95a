"""The local pod runner: real processes behind simulated pods.

kwok makes pods Running on simulated nodes, but nothing runs in them. For pods whose container
image is one of the project's (matched by image name, any registry or tag), this runner starts
the real program on this machine, bound to the pod's loopback IP and container port, with the
pod's environment, and stops it when the pod goes away. Everything stays on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client, config

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class PodProcessSpec:
    """What to run for one container: the command and the environment."""

    command: list[str]
    env: dict[str, str]


def image_name(image: str) -> str:
    """``registry.example/team/zimage-server:1.2@sha256:..`` -> ``zimage-server``."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


def server_process(runner: LocalPodRunner, pod: Any, container: Any, env: dict[str, str]) -> PodProcessSpec:
    ports = container.ports or []
    named = [item for item in ports if item.name == "http"]
    port = (named or ports)[0].container_port if ports else DEFAULT_PORT
    env = {**env, "ZIMAGE_HOST": pod.status.pod_ip, "ZIMAGE_PORT": str(port)}
    # The nodes are simulated: the server runs on this machine's CPU, one thread per process
    # so that several pods share two cores, without what needs a GPU (fp8) or pays only on one
    # (compile), unless the pod shares compile artifacts: then it compiles as asked (Inductor's
    # CPU code, with this machine's C compiler), so that replicas share what they compiled.
    env.update(ZIMAGE_DEVICE="cpu", OMP_NUM_THREADS="1", ZIMAGE_PRECISION="bf16")
    if not env.get("ZIMAGE_COMPILE_ARTIFACTS_DIR"):
        env["ZIMAGE_COMPILE"] = "false"
    return PodProcessSpec([sys.executable, "-m", "zimage_server", *(container.args or ["serve"])], env)


def operator_process(runner: LocalPodRunner, pod: Any, container: Any, env: dict[str, str]) -> PodProcessSpec:
    """The operator, with the pod's service account: a kubeconfig holding a token from the
    TokenRequest API, so the operator's RBAC is exercised for real."""
    kubeconfig = runner.service_account_kubeconfig(pod)
    env = {key: value for key, value in env.items() if not key.startswith("KUBERNETES_SERVICE")}
    env.update(KUBECONFIG=str(kubeconfig), ZIMAGE_OPERATOR_HEALTH_HOST=pod.status.pod_ip)
    return PodProcessSpec([sys.executable, "-m", "zimage_operator", *(container.args or [])], env)


def _remap(value: str, mounts: dict[str, Path]) -> str:
    """A path under a mount path as the folder here; also each such path quoted inside a JSON
    value (ZIMAGE_LORAS's sources, say)."""
    for mount_path, folder in mounts.items():
        if value == mount_path or value.startswith(mount_path + "/"):
            return str(folder) + value[len(mount_path) :]
    for mount_path, folder in mounts.items():
        value = value.replace(f'"{mount_path}/', f'"{folder}/')
    return value


def runs_to_completion(pod: Any) -> bool:
    """A Helm test pod: it runs its own command once and reports how it ended."""
    hook = (pod.metadata.annotations or {}).get("helm.sh/hook", "")
    return "test" in hook.split(",") and pod.spec.restart_policy == "Never"


def command_process(runner: LocalPodRunner, pod: Any, container: Any, env: dict[str, str]) -> PodProcessSpec:
    command = [*(container.command or []), *(container.args or [])]
    if command and command[0] in ("python", "python3"):
        command[0] = sys.executable
    return PodProcessSpec(command, {**env, **runner.service_links(pod.metadata.namespace)})


Launcher = Callable[["LocalPodRunner", Any, Any, dict[str, str]], PodProcessSpec]
# image name -> how to run it
LAUNCHERS: dict[str, Launcher] = {"zimage-server": server_process, "zimage-operator": operator_process}


@dataclass
class RunningPod:
    uid: str
    key: str
    address: str
    process: subprocess.Popen[bytes]
    log: Path


class LocalPodRunner:
    def __init__(
        self,
        kubeconfig: Path,
        workdir: Path,
        poll_seconds: float = 0.3,
        images: frozenset[str] = frozenset(LAUNCHERS),
    ) -> None:
        """``images``: the image names to run (default: all the project's)."""
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.poll_seconds = poll_seconds
        self.images = images
        api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(api_client)
        self.running: dict[str, RunningPod] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="local-pod-runner", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> LocalPodRunner:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            for uid in list(self.running):
                self._terminate(uid)

    def __enter__(self) -> LocalPodRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pids(self) -> list[int]:
        with self._lock:
            return [pod.process.pid for pod in self.running.values()]

    def process_of(self, namespace: str, name: str) -> subprocess.Popen[bytes] | None:
        with self._lock:
            for pod in self.running.values():
                if pod.key == f"{namespace}/{name}":
                    return pod.process
        return None

    def running_pod(self, namespace: str, name: str) -> RunningPod | None:
        with self._lock:
            return next((pod for pod in self.running.values() if pod.key == f"{namespace}/{name}"), None)

    def address_of(self, namespace: str, name: str) -> str | None:
        with self._lock:
            for pod in self.running.values():
                if pod.key == f"{namespace}/{name}":
                    return pod.address
        return None

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception:  # the API may be briefly unavailable; try again
                logger.exception("pod runner sync failed")
            self._stop.wait(self.poll_seconds)

    def sync_once(self) -> None:
        pods = self.core.list_pod_for_all_namespaces().items
        wanted: dict[str, Any] = {}
        for pod in pods:
            if pod.metadata.deletion_timestamp or not pod.status.pod_ip or pod.status.phase != "Running":
                continue
            if any(image_name(c.image) in self.images for c in pod.spec.containers):
                wanted[pod.metadata.uid] = pod
        with self._lock:
            for uid in list(self.running):
                if uid not in wanted:
                    self._terminate(uid)
            for uid, pod in wanted.items():
                current = self.running.get(uid)
                if current is not None and current.process.poll() is not None and runs_to_completion(pod):
                    self._complete(pod, current.process.returncode)
                    del self.running[uid]
                    continue
                if current is not None and current.process.poll() is not None:
                    # restartPolicy Always, as the kubelet would do
                    logger.warning(
                        "process for pod %s exited with %s; restarting",
                        current.key,
                        current.process.returncode,
                    )
                    del self.running[uid]
                    current = None
                if current is None:
                    self._launch(pod)

    def _launch(self, pod: Any) -> None:
        container = next(c for c in pod.spec.containers if image_name(c.image) in self.images)
        env = self._environment(pod, container)
        if runs_to_completion(pod):
            spec = command_process(self, pod, container, env)
        else:
            spec = LAUNCHERS[image_name(container.image)](self, pod, container, env)
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        log = self.workdir / f"{pod.metadata.namespace}_{pod.metadata.name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                spec.command,
                env=spec.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        address = f"{spec.env.get('ZIMAGE_HOST', pod.status.pod_ip)}:{spec.env.get('ZIMAGE_PORT', '')}"
        self.running[pod.metadata.uid] = RunningPod(pod.metadata.uid, key, address, process, log)
        logger.info("started pid %d for pod %s at %s", process.pid, key, address)

    def _complete(self, pod: Any, code: int) -> None:
        """Report a finished run-to-completion pod, as the kubelet would."""
        container = pod.spec.containers[0]
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "finishedAt": now}
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": container.name,
                    "image": container.image,
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        }
        self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace, {"status": status})
        logger.info("pod %s/%s finished with %d", pod.metadata.namespace, pod.metadata.name, code)

    def service_links(self, namespace: str) -> dict[str, str]:
        """The kubelet's ``<SERVICE>_SERVICE_HOST``/``_PORT`` variables. With no kube-proxy
        here, they point straight at a ready endpoint of each Service."""
        links: dict[str, str] = {}
        pods = self.core.list_namespaced_pod(namespace).items
        for service in self.core.list_namespaced_service(namespace).items:
            selector = service.spec.selector or {}
            if not selector or not service.spec.ports:
                continue
            backends = [
                p
                for p in pods
                if p.status.pod_ip
                and p.status.phase == "Running"
                and selector.items() <= (p.metadata.labels or {}).items()
            ]
            if not backends:
                continue
            port = service.spec.ports[0]
            target = port.target_port if port.target_port is not None else port.port
            if isinstance(target, str):  # a named port: look it up on the backend
                named = [cp for c in backends[0].spec.containers for cp in c.ports or [] if cp.name == target]
                target = named[0].container_port if named else port.port
            prefix = service.metadata.name.upper().replace("-", "_")
            links[f"{prefix}_SERVICE_HOST"] = backends[0].status.pod_ip
            links[f"{prefix}_SERVICE_PORT"] = str(target)
        return links

    def service_account_kubeconfig(self, pod: Any) -> Path:
        namespace, account = pod.metadata.namespace, pod.spec.service_account_name or "default"
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=3600)
        )
        token = self.core.create_namespaced_service_account_token(account, namespace, request).status.token
        admin = yaml.safe_load(self.kubeconfig.read_text())
        cluster = admin["clusters"][0]["cluster"]
        config_doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": cluster}],
            "users": [{"name": f"{namespace}:{account}", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "pod",
                    "context": {"cluster": "local", "user": f"{namespace}:{account}", "namespace": namespace},
                }
            ],
            "current-context": "pod",
        }
        path = self.workdir / f"{namespace}_{pod.metadata.name}.kubeconfig"
        path.write_text(yaml.safe_dump(config_doc))
        path.chmod(0o600)
        return path

    def _terminate(self, uid: str, grace: float = 15) -> None:
        pod = self.running.pop(uid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pod.process.pid, sig)
            try:
                pod.process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        logger.info("stopped pod %s (pid %d)", pod.key, pod.process.pid)

    def _environment(self, pod: Any, container: Any) -> dict[str, str]:
        """This machine's environment plus the container's env (values, Secret and
        ConfigMap references, and the pod fields a container commonly asks for)."""
        env = dict(os.environ)
        mounts = self._mounts(pod, container)
        for item in container.env or []:
            if item.value is not None:
                env[item.name] = _remap(item.value, mounts)
            elif item.value_from is not None:
                resolved = self._resolve(pod, item.value_from)
                if resolved is not None:
                    env[item.name] = resolved
        return env

    def _mounts(self, pod: Any, container: Any) -> dict[str, Path]:
        """Volumes as folders here; mount path -> folder. A Secret volume is made as the kubelet
        makes it, files of the Secret's keys in a folder of the pod's, and an emptyDir is an
        empty folder of the pod's; a claim is one folder per claim, shared by every pod that
        mounts it (as a ReadWriteMany volume is). A path in the env under a mount path is read
        from the folder instead."""
        volumes = {v.name: v for v in pod.spec.volumes or []}
        secrets = {v.name: v.secret for v in pod.spec.volumes or [] if v.secret is not None}
        mounts: dict[str, Path] = {}
        for mount in container.volume_mounts or []:
            volume = volumes.get(mount.name)
            claim = volume.persistent_volume_claim if volume is not None else None
            own = self.workdir / f"{pod.metadata.namespace}_{pod.metadata.name}" / "volumes" / mount.name
            if claim is not None or (volume is not None and volume.empty_dir is not None):
                folder = (
                    self.workdir / "claims" / f"{pod.metadata.namespace}_{claim.claim_name}" if claim else own
                )
                folder = folder / mount.sub_path if mount.sub_path else folder
                folder.mkdir(parents=True, exist_ok=True)
                mounts[mount.mount_path.rstrip("/")] = folder
                continue
            source = secrets.get(mount.name)
            if source is None:
                continue
            folder = own
            folder.mkdir(parents=True, exist_ok=True)
            data = self.core.read_namespaced_secret(source.secret_name, pod.metadata.namespace).data or {}
            items = source.items or [client.V1KeyToPath(key=key, path=key) for key in data]
            for item in items:
                if item.key in data:
                    (folder / item.path).write_bytes(base64.b64decode(data[item.key]))
            mounts[mount.mount_path.rstrip("/")] = folder
        return mounts

    def _resolve(self, pod: Any, source: Any) -> str | None:
        namespace = pod.metadata.namespace
        if source.secret_key_ref is not None:
            ref = source.secret_key_ref
            secret = self.core.read_namespaced_secret(ref.name, namespace)
            data = (secret.data or {}).get(ref.key)
            return base64.b64decode(data).decode() if data is not None else None
        if source.config_map_key_ref is not None:
            ref = source.config_map_key_ref
            return (self.core.read_namespaced_config_map(ref.name, namespace).data or {}).get(ref.key)
        if source.field_ref is not None:
            fields = {
                "metadata.name": pod.metadata.name,
                "metadata.namespace": namespace,
                "status.podIP": pod.status.pod_ip,
                "spec.nodeName": pod.spec.node_name,
                "spec.serviceAccountName": pod.spec.service_account_name,
            }
            value = fields.get(source.field_ref.field_path)
            return None if value is None else str(value)
        return None


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``predicate`` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return result
