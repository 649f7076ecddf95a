"""Compiled kernels shared between replicas: saved once, loaded by the next, never trusted blindly."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from zimage_server.core.processes import free_port, stop_process
from zimage_server.pipeline import compile_artifacts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One real CPU compile in this process, so there are artifacts to save."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    function = torch.compile(lambda x: torch.sin(x) * 2 + 1)
    function(torch.randn(8))


def test_artifacts_saved_whole_load_and_a_damaged_file_is_ignored(compiled: None, tmp_path: Path) -> None:
    found = compile_artifacts.identity(torch.device("cpu"), precision="bf16", compiled=["transformer"])
    path = compile_artifacts.artifact_path(tmp_path / "shared", found)
    assert compile_artifacts.load(path).state == "absent"
    saved = compile_artifacts.save(path)
    assert saved.state == "saved"
    assert compile_artifacts.load(path).state == "loaded"
    # Another choice (or another version, card, driver) names another file.
    other = compile_artifacts.identity(torch.device("cpu"), precision="fp8", compiled=["transformer"])
    assert compile_artifacts.artifact_path(tmp_path / "shared", other) != path
    # So does another version of the server's code that decides what is traced.
    assert found["versions"]["server-code"] == compile_artifacts.server_code_digest()
    with mock.patch.object(compile_artifacts, "server_code_digest", return_value="other-code"):
        changed = compile_artifacts.identity(torch.device("cpu"), precision="bf16", compiled=["transformer"])
    assert compile_artifacts.artifact_path(tmp_path / "shared", changed) != path

    whole = path.read_bytes()
    for damaged, reason in (
        (whole[: len(whole) // 2], "partial"),
        (whole[:-1] + bytes([whole[-1] ^ 1]), "corrupt"),
        (b"garbage" * 10, "wrong header"),
        (b"", "shorter than its header"),
    ):
        path.write_bytes(damaged)
        state = compile_artifacts.load(path)
        assert state.state == "ignored"
        assert reason in state.detail
    # A replica that found it damaged puts a whole one in its place.
    assert compile_artifacts.save(path).state == "exists"
    assert compile_artifacts.save(path, replace=True).state == "saved"
    assert path.read_bytes() == whole
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left"


def test_the_compile_time_account_grows_with_a_compile(compiled: None) -> None:
    before = compile_artifacts.compile_seconds()
    assert before is not None
    assert before > 0  # the fixture's compile
    function = torch.compile(lambda x: torch.cos(x) - 3)
    function(torch.randn(5))
    after = compile_artifacts.compile_seconds()
    assert after is not None
    assert after > before
    steps = compile_artifacts.compile_time_parts(4)
    assert len(steps) == 4
    assert [seconds for _, seconds in steps] == sorted((seconds for _, seconds in steps), reverse=True)
    # A frame's whole compile, which the other steps nest in (kernels compiled side by side
    # can add up to more), is the account's total.
    assert ("_compile.compile_inner", after) in steps


def test_replicas_saving_at_once_leave_one_whole_file(compiled: None, tmp_path: Path) -> None:
    path = compile_artifacts.artifact_path(tmp_path, {"case": "race"})
    results: list[str] = []
    barrier = threading.Barrier(4)

    def replica() -> None:
        barrier.wait()
        results.append(compile_artifacts.save(path).state)

    threads = [threading.Thread(target=replica) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["exists", "exists", "exists", "saved"]
    assert compile_artifacts.load(path).state == "loaded"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


STARTUP = "zimage_startup_seconds"


def _metrics(url: str) -> dict[str, float]:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    values = {}
    for family in families:
        for sample in family.samples:
            if sample.name in ("zimage_compile_artifacts", "zimage_compile_fx_graphs", STARTUP):
                label = sample.labels.get("state") or sample.labels.get("result") or sample.labels["phase"]
                values[f"{sample.name}:{label}"] = sample.value
    return values


def _serve_until_compiled(
    tiny_model_dir: Path, shared: Path, local_cache: Path
) -> tuple[dict[str, float], dict[str, Any]]:
    """One replica as a process of its own (its own in-memory compile state and local cache):
    its metrics and what its /load says of the artifacts, once its compiled pipeline serves
    (it is ready before that, serving uncompiled)."""
    port = free_port()
    log = local_cache.with_suffix(".log").open("w+")  # a file, not a pipe nobody drains
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "zimage_server", "serve", "--port", str(port),
            "--model", str(tiny_model_dir), "--device", "cpu", "--compile", "true",
            "--compile-cache-dir", str(local_cache), "--compile-artifacts-dir", str(shared),
            "--warmup-sizes", "256x256", "--min-size", "64",
            # One image a batch: the warm-up's two calls instead of six (no batch shapes).
            "--max-batch-size", "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                log.seek(0)
                raise AssertionError(f"the server exited {proc.returncode}:\n{log.read()[-6000:]}")
            try:
                if httpx.get(f"{url}/healthz/ready", timeout=2).status_code == 200:
                    load = httpx.get(f"{url}/load", timeout=10).json()
                    if load["compile"] == "compiled":
                        return _metrics(url), load["compile_artifacts"]
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError("the server's compiled pipeline did not serve within 10 minutes")
    finally:
        stop_process(proc)
        log.close()


def test_the_second_replica_loads_what_the_first_compiled(tiny_model_dir: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    first, first_load = _serve_until_compiled(tiny_model_dir, shared, tmp_path / "local-1")
    assert first["zimage_compile_artifacts:saved"] == 1
    assert first["zimage_compile_fx_graphs:miss"] > 0
    (artifact,) = shared.glob("zimage-compile-*.bin")
    # The load signal the operator reads tells it too, with the file's name.
    assert first_load == {"state": "saved", "artifact": compile_artifacts.artifact_key(artifact)}

    # A new replica, on a node of its own: nothing in its local cache, the shared file only.
    second, second_load = _serve_until_compiled(tiny_model_dir, shared, tmp_path / "local-2")
    assert second["zimage_compile_artifacts:loaded"] == 1
    assert second_load == {"state": "loaded", "artifact": compile_artifacts.artifact_key(artifact)}
    assert second["zimage_compile_fx_graphs:hit"] >= first["zimage_compile_fx_graphs:miss"]
    assert second["zimage_compile_fx_graphs:miss"] == 0, "the second replica compiled a graph again"
    assert list(shared.glob("zimage-compile-*.bin")) == [artifact]
    # The start-up's account tells the warm-up's compiling from its running: part of the
    # warm-up, and less of it where the compiled graphs came from the artifacts.
    for replica in (first, second):
        assert 0 < replica[f"{STARTUP}:warmup_compile"] <= replica[f"{STARTUP}:warmup"]
    assert second[f"{STARTUP}:warmup_compile"] < first[f"{STARTUP}:warmup_compile"]
