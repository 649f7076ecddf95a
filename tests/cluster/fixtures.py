"""A session-scoped local Kubernetes control plane, and the local pod runner beside it."""

from __future__ import annotations

import itertools
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from .local_cluster import LocalCluster, build_binaries, processes_under
from .pod_runner import LocalPodRunner, wait_until

_NAMESPACE_NUMBERS = itertools.count(1)


@pytest.fixture(scope="session")
def cluster_binaries() -> Path:
    return build_binaries()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, cluster_binaries: Path) -> Iterator[LocalCluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    local = LocalCluster(workdir=workdir, binaries=cluster_binaries)
    local.up()
    try:
        yield local
    finally:
        local.down()
        # Nothing started for this cluster may outlive it.
        assert processes_under(str(workdir)) == [], "cluster processes outlived the cluster"


@pytest.fixture(scope="session")
def node_cluster(tmp_path_factory: pytest.TempPathFactory, cluster_binaries: Path) -> Iterator[LocalCluster]:
    """A second local cluster, beside ``cluster``: one simulated GPU node and one real kubelet
    node, all in a network namespace of its own (see node_host.py)."""
    workdir = tmp_path_factory.mktemp("node-cluster")
    local = LocalCluster(workdir=workdir, binaries=cluster_binaries, gpu_nodes=1, kubelet_nodes=1)
    local.up()
    try:
        yield local
    finally:
        local.down()
        assert local.leftovers() == [], "the kubelet cluster left things behind"


@pytest.fixture(scope="session")
def api(cluster: LocalCluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


@pytest.fixture
def namespace(api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower().removeprefix("test_"))[:40].strip("-")
    name = f"t{next(_NAMESPACE_NUMBERS)}-{slug}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    try:
        core.delete_namespace(name)
    except ApiException as exc:
        if exc.status != 404:  # the test may have deleted it already
            raise


@pytest.fixture
def pod_runner(cluster: LocalCluster, tmp_path: Path) -> Iterator[LocalPodRunner]:
    # Servers only: the operator fixture runs the operator's pod.
    with LocalPodRunner(cluster.kubeconfig, tmp_path / "pods", images=frozenset({"zimage-server"})) as runner:
        yield runner


ROOT = Path(__file__).resolve().parents[2]
OPERATOR_NAMESPACE = "zimage-system"


@pytest.fixture(scope="session")
def operator(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPodRunner]:
    """The operator installed from deploy/ with `kubectl apply -k`; the local pod runner runs the
    real operator process for its pod, with a token of its service account."""
    cluster.kubectl("apply", "--server-side", "-k", str(ROOT / "deploy"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/zimageservices.zimage.dev", "--timeout=60s")
    runner = LocalPodRunner(
        cluster.kubeconfig, tmp_path_factory.mktemp("operator-pods"), images=frozenset({"zimage-operator"})
    ).start()
    try:
        wait_until(lambda: bool(runner.pids()), 60, "the operator process to start")
        yield runner
    finally:
        runner.stop()


# -- a failing test's report carries what the harness's processes printed ---------------------

LOG_TAIL_BYTES = 6000
_STARTED = pytest.StashKey[float]()


def _log_folders(value: Any) -> list[Path]:
    if isinstance(value, LocalCluster):
        return [value.workdir]
    if isinstance(value, LocalPodRunner):
        return [value.workdir]
    return []


def _tail(path: Path) -> str:
    with path.open("rb") as log:
        size = log.seek(0, 2)
        log.seek(max(0, size - LOG_TAIL_BYTES))
        text = log.read().decode(errors="replace")
    return text if size <= LOG_TAIL_BYTES else f"[... {size - LOG_TAIL_BYTES} bytes before]\n{text}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_STARTED] = time.time()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On failure, attach the end of every log that a cluster, pod runner or operator fixture of
    the test wrote to while it ran: the control plane's components, the kubelet node's
    containerd and kubelet, and each process the pod runners started."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed:
        return
    started = item.stash.get(_STARTED, 0.0)
    funcargs = getattr(item, "funcargs", {})
    folders = {folder for value in funcargs.values() for folder in _log_folders(value)}
    for folder in sorted(folders):
        for log in sorted(folder.rglob("*.log")):
            try:
                if log.stat().st_mtime < started:
                    continue
                report.sections.append((f"{report.when} log {log.relative_to(folder)}", _tail(log)))
            except OSError:
                continue


# -- which operator replica leads -------------------------------------------------------------

LEASE = "zimage-operator"


def leader_identity(api: client.ApiClient, namespace: str = OPERATOR_NAMESPACE) -> str | None:
    """The identity in the Lease: ``POD_NAME_suffix``, the suffix new for each process."""
    try:
        lease = client.CoordinationV1Api(api).read_namespaced_lease(LEASE, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    holder: str | None = lease.spec.holder_identity
    return holder or None


def leader_pod(api: client.ApiClient, namespace: str = OPERATOR_NAMESPACE) -> str | None:
    """The name of the operator pod whose process holds the Lease."""
    return (leader_identity(api, namespace) or "").rpartition("_")[0] or None


def leading_process(operator: LocalPodRunner, api: client.ApiClient) -> Any:
    """The process of the leading operator replica (waiting for one to lead)."""

    def find() -> Any:
        name = leader_pod(api)
        return operator.running_pod(OPERATOR_NAMESPACE, name) if name else None

    return wait_until(find, 60, "an operator replica to lead")


def leader_ip(operator: LocalPodRunner, api: client.ApiClient) -> str:
    """The pod IP of the leading operator replica, once its /metrics answers (the standby's
    health server hands the port over to the leader's as it starts to lead)."""
    name = leading_process(operator, api).key.split("/", 1)[1]
    ip: str = client.CoreV1Api(api).read_namespaced_pod(name, OPERATOR_NAMESPACE).status.pod_ip

    def leads() -> bool:
        try:
            text = httpx.get(f"http://{ip}:8080/metrics", timeout=5).text
        except httpx.HTTPError:
            return False
        return "zimage_operator_leader 1.0" in text

    wait_until(leads, 60, "the leading operator replica's /metrics")
    return ip


def kill_leader(operator: LocalPodRunner, api: client.ApiClient) -> int:
    """SIGKILL the leading operator replica's process; its PID. The pod runner starts it again,
    as the kubelet would, and that process stands by until the Lease is free."""
    pid: int = leading_process(operator, api).process.pid
    os.kill(pid, signal.SIGKILL)
    return pid
