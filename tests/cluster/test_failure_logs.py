"""A failing test's report carries the logs its cluster fixtures' processes wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAILING = """
import pytest
from pathlib import Path
from tests.cluster.local_cluster import LocalCluster

@pytest.fixture
def stopped_cluster(tmp_path):
    workdir = tmp_path / "cluster"
    workdir.mkdir()
    (workdir / "old.log").write_text("written before the test")
    import os, time
    os.utime(workdir / "old.log", (time.time() - 3600, time.time() - 3600))
    return LocalCluster(workdir=workdir, binaries=Path())

def test_the_operator_keeps_exiting(stopped_cluster):
    log = stopped_cluster.workdir / "zimage-operator.log"
    log.write_text("Traceback: operator exits 1: bad kubeconfig")
    assert False, "the service never became Ready"

def test_passes(stopped_cluster):
    (stopped_cluster.workdir / "quiet.log").write_text("nothing to see")
"""


def test_a_failing_test_shows_the_end_of_each_log_written_while_it_ran(tmp_path: Path) -> None:
    test_file = tmp_path / "test_failing.py"
    test_file.write_text(FAILING)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.cluster.fixtures",
            "-q",
            str(test_file),
            "-p",
            "no:cacheprovider",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "call log zimage-operator.log" in run.stdout
    assert "operator exits 1: bad kubeconfig" in run.stdout
    assert "written before the test" not in run.stdout  # only logs the test's own time wrote to
    assert "nothing to see" not in run.stdout  # a passing test's logs stay out of the report
