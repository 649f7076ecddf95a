"""What the end-to-end tests share: names, and kubectl output as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.cluster.local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "zimage-operator"
OPERATOR_NAMESPACE = "zimage-system"
KUBELET_NODE = {"zimage.dev/node-kind": "kubelet"}


def kube_json(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)
