"""Suite-wide rules: GPU tests run only where PyTorch sees a GPU."""

from __future__ import annotations

import importlib.util

import pytest

# The local control plane's fixtures (cluster, api, namespace, pod_runner, operator) for every
# suite, where the Kubernetes client is installed (a GPU machine running `-m gpu` may lack it).
pytest_plugins = ["tests.cluster.fixtures"] if importlib.util.find_spec("kubernetes") else []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; run `make test-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
