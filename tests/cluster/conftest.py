"""A session-scoped local Kubernetes control plane, and the local pod runner beside it."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from .local_cluster import LocalCluster, build_binaries, processes_under
from .pod_runner import LocalPodRunner


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
def api(cluster: LocalCluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


@pytest.fixture
def namespace(api: client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"t{os.getpid() % 10000}-{slug}"
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture
def pod_runner(cluster: LocalCluster, tmp_path: Path) -> Iterator[LocalPodRunner]:
    with LocalPodRunner(cluster.kubeconfig, tmp_path / "pods") as runner:
        yield runner
