"""Model sources resolve to a local pipeline, and the runner loads it the way it loads real weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zimage_server.core.config import Settings
from zimage_server.core.sources import ModelSource, ModelSourceError
from zimage_server.pipeline.model_source import resolve
from zimage_server.pipeline.runner import BatchSpec, PipelineRunner, pick_device, pick_dtype

from .conftest import COMMIT, hub_cache


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("builtin://tiny", ModelSource("builtin", "tiny")),
        ("", ModelSource("builtin", "tiny")),
        ("/models/z", ModelSource("file", "/models/z")),
        ("file:///models/z", ModelSource("file", "/models/z")),
        ("hf://Tongyi-MAI/Z-Image-Turbo", ModelSource("hf", "Tongyi-MAI/Z-Image-Turbo", "main")),
        ("hf://Tongyi-MAI/Z-Image-Turbo@abc123", ModelSource("hf", "Tongyi-MAI/Z-Image-Turbo", "abc123")),
    ],
)
def test_model_sources_parse(source: str, expected: ModelSource) -> None:
    assert ModelSource.parse(source) == expected


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("hf://just-a-name", "hf://OWNER/NAME"),
        ("hf://a/b/c", "hf://OWNER/NAME"),
        ("builtin://huge", "the only one is builtin://tiny"),
        ("s3://bucket/model", "unsupported model source"),
    ],
)
def test_bad_model_sources_are_explained(source: str, words: str) -> None:
    with pytest.raises(ModelSourceError, match=words):
        ModelSource.parse(source)


def test_hf_source_loads_from_the_cache_when_offline(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hub_cache(tmp_path / "hub", tiny_model_dir)
    assert resolve(ModelSource.parse("hf://acme/tiny-zimage"), str(tmp_path / "hub")) == snapshot
    assert resolve(ModelSource.parse(f"hf://acme/tiny-zimage@{COMMIT}"), str(tmp_path / "hub")) == snapshot

    runner = PipelineRunner(
        Settings(_env_file=None, model="hf://acme/tiny-zimage", hf_cache_dir=str(tmp_path / "hub"))
    )
    runner.load()
    result = runner.generate(BatchSpec(["a fox"], [1], 128, 128, 2))
    assert result.images[0].size == (128, 128)


def test_hf_source_missing_from_the_offline_cache_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE is set"):
        resolve(ModelSource.parse("hf://acme/absent"), str(tmp_path / "hub"))


def test_a_directory_without_a_pipeline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"model_index\.json is missing"):
        resolve(ModelSource.parse(str(tmp_path)))


def test_device_and_dtype_defaults() -> None:
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")


def test_tiny_model_uses_the_real_classes(tiny_model_dir: Path) -> None:
    runner = PipelineRunner(Settings(_env_file=None, model=str(tiny_model_dir), device="cpu"))
    runner.load()
    pipe = runner.pipe
    assert type(pipe).__name__ == "ZImagePipeline"
    assert type(pipe.transformer).__name__ == "ZImageTransformer2DModel"
    assert type(pipe.text_encoder).__name__ == "Qwen3Model"
    assert type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.tokenizer.chat_template, "the pipeline formats prompts with the chat template"
    assert pipe.transformer.dtype == torch.float32


def test_dtype_can_be_overridden(tiny_model_dir: Path) -> None:
    runner = PipelineRunner(
        Settings(_env_file=None, model=str(tiny_model_dir), device="cpu", dtype="bfloat16")
    )
    runner.load()
    assert runner.pipe.transformer.dtype == torch.bfloat16
    result = runner.generate(BatchSpec(["a fox", "a hen"], [1, 2], 128, 128, 2))
    assert [image.size for image in result.images] == [(128, 128)] * 2
    assert len(result.step_seconds) == 1, "two steps: the first interval holds text encoding and is left out"


def test_prefetch_finds_a_cached_snapshot(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from zimage_server.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hub_cache(tmp_path / "hub", tiny_model_dir)
    assert (
        main(["prefetch", "--model", "hf://acme/tiny-zimage", "--hf-cache-dir", str(tmp_path / "hub")]) == 0
    )
    assert str(snapshot) in capsys.readouterr().out


def test_prefetch_reports_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from zimage_server.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["prefetch", "--model", "hf://acme/absent", "--hf-cache-dir", str(tmp_path)]) == 1
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
