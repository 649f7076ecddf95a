"""The weights are read into the page cache from the process's start, where the model is on
local storage, and the reading stops once the load has them."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from zimage_server.core.config import Settings
from zimage_server.pipeline import weight_prefetch
from zimage_server.pipeline.runner import PipelineRunner
from zimage_server.pipeline.weight_prefetch import WeightPrefetch, local_directory, weight_files

from .conftest import hub_cache


def _sizes(files: list[Path]) -> int:
    return sum(path.stat().st_size for path in files)


def test_the_weight_files_of_a_pipeline_are_found_largest_first(tiny_model_dir: Path) -> None:
    files = weight_files(tiny_model_dir)
    assert {path.parent.name for path in files} == {"transformer", "text_encoder", "vae"}
    assert all(path.suffix == ".safetensors" for path in files)
    sizes = [path.stat().st_size for path in files]
    assert sizes == sorted(sizes, reverse=True)


def test_only_sources_on_local_storage_are_read(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert local_directory(str(tiny_model_dir), "main", None) == tiny_model_dir
    assert local_directory(f"file://{tiny_model_dir}", "main", None) == tiny_model_dir
    assert local_directory(str(tmp_path / "nowhere"), "main", None) is None
    assert local_directory("builtin://tiny", "main", None) is None
    snapshot = hub_cache(tmp_path / "hub", tiny_model_dir)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # Online, the load may download: nothing to read ahead of it.
    assert local_directory("hf://acme/tiny-zimage", "main", str(tmp_path / "hub")) is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert local_directory("hf://acme/tiny-zimage", "main", str(tmp_path / "hub")) == snapshot
    # Not in the cache: left to the load, which says what to do.
    assert local_directory("hf://acme/other", "main", str(tmp_path / "hub")) is None


def test_every_byte_is_read_once(tiny_model_dir: Path) -> None:
    files = weight_files(tiny_model_dir)
    prefetch = WeightPrefetch(lambda: files, chunk_bytes=4096).start()
    assert prefetch.finished.wait(60)
    assert prefetch.bytes_read == _sizes(files) > 0
    assert prefetch.files == files


def test_stopping_ends_the_reading(tiny_model_dir: Path) -> None:
    files = weight_files(tiny_model_dir)
    found = threading.Event()

    def find() -> list[Path]:
        found.wait(10)  # the files are found only after the stop was asked for
        return files

    prefetch = WeightPrefetch(find).start()
    threading.Timer(0.2, found.set).start()
    prefetch.stop()
    assert prefetch.finished.is_set()
    assert prefetch.bytes_read == 0


def test_an_unreadable_file_stops_the_reading_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    present = tmp_path / "a.safetensors"
    present.write_bytes(b"x" * 1000)
    with caplog.at_level(logging.WARNING, logger="zimage_server.pipeline.weight_prefetch"):
        prefetch = WeightPrefetch(lambda: [present, tmp_path / "gone.safetensors"]).start()
        assert prefetch.finished.wait(10)
    assert prefetch.bytes_read == 1000
    assert any("weight prefetch stopped" in record.getMessage() for record in caplog.records)


def test_the_load_stops_the_process_prefetch_and_reports_it(tiny_model_dir: Path) -> None:
    prefetch = weight_prefetch.start(str(tiny_model_dir), "main", None)
    runner = PipelineRunner(Settings(_env_file=None, model=str(tiny_model_dir)))
    runner.load()
    assert prefetch.finished.is_set()
    assert prefetch.files == weight_files(tiny_model_dir)
    assert runner.startup_seconds["weights_prefetch"] == prefetch.seconds > 0
    assert weight_prefetch.finish() is None  # once per process
    # A second load in the process finds none running and reports none.
    again = PipelineRunner(Settings(_env_file=None, model=str(tiny_model_dir)))
    again.load()
    assert "weights_prefetch" not in again.startup_seconds
