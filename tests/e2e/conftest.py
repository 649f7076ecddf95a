"""The end-to-end fixtures: the Dockerfile's images loaded into the kubelet node, and the chart
installed once with the operator image for the whole session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import yaml

from tests.cluster import images
from tests.cluster.local_cluster import LocalCluster

from .support import CHART, KUBELET_NODE, OPERATOR_NAMESPACE


def _load(cluster: LocalCluster, target: str) -> str:
    (archive,) = images.build([target]).values()
    cluster.import_image("node-0", archive)
    return images.image_name(target)


@pytest.fixture(scope="session")
def operator_image(node_cluster: LocalCluster) -> str:
    """The operator image built from the Dockerfile and loaded into the kubelet node."""
    return _load(node_cluster, "operator")


@pytest.fixture(scope="session")
def server_image(node_cluster: LocalCluster) -> str:
    """The server image built from the Dockerfile and loaded into the kubelet node."""
    return _load(node_cluster, "server")


@pytest.fixture(scope="session")
def operator_release(
    node_cluster: LocalCluster, operator_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    """`helm install` of the chart with the operator image, pinned to the kubelet node."""
    workdir = tmp_path_factory.mktemp("helm")
    repository, tag = operator_image.rsplit(":", 1)
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "nodeSelector": KUBELET_NODE,
    }
    (workdir / "values.yaml").write_text(yaml.safe_dump(values))
    helm = node_cluster.helm(
        workdir,
        "install",
        "zimage",
        str(CHART),
        "--create-namespace",
        "-f",
        str(workdir / "values.yaml"),
        namespace=OPERATOR_NAMESPACE,
    )
    assert helm.returncode == 0, helm.stderr
    try:
        yield node_cluster
    finally:
        node_cluster.helm(
            workdir, "uninstall", "zimage", "--wait", "--timeout", "120s", namespace=OPERATOR_NAMESPACE
        )
