"""``make demo`` end to end: the local cluster, the chart, the minimal example on the tiny model,
the playground answering on the printed loopback URL; ``make demo-down`` leaves nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.cluster.local_cluster import processes_under

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def demo(command: str, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.cluster.demo", command, "--dir", str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_demo_serves_the_playground_and_goes_away(cluster_binaries: Path, tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    started = demo("up", folder)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        match = re.search(r"The playground: (http://(127\.[0-9.]+):[0-9]+/)", started.stdout)
        assert match, started.stdout
        url = match.group(1)
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200
        assert "Z-Image playground" in page.text
        body = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 2, "stream": True}
        with httpx.stream("POST", url + "v1/images/generations", json=body, timeout=120) as response:
            assert response.status_code == 200
            text = response.read().decode()
        assert "event: image_generation.completed" in text
        again = demo("up", folder)
        assert again.returncode == 1
        assert "make demo-down" in again.stderr
    finally:
        stopped = demo("down", folder)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not folder.exists()
    assert processes_under(str(folder)) == []
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)
