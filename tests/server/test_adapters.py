"""LoRA adapters on the tiny model, with adapters made the way a user's are (lora_files.py):
each changes the image as diffusers' own loading does, scale 0 is the base model exactly, a
batch of mixed requests gives each its own, switching under compile compiles nothing, and bad
adapters and bad requests get clear answers without harming anything else."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image
from safetensors.torch import save_file

from zimage_server.core.config import Settings
from zimage_server.pipeline.runner import BatchSpec, PipelineRunner

from .conftest import RunningServer, ServerFactory, pixel_difference
from .lora_files import make_adapter

GEN = "/v1/images/generations"
PROMPT = "a lighthouse on a cliff at dusk"


@pytest.fixture(scope="module")
def adapter_files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    files = {
        "pixel": make_adapter(tiny_model_dir, root / "pixel", rank=4, seed=1),
        # Attention only, another rank and alpha: its scaling is alpha over rank (2).
        "ink": make_adapter(tiny_model_dir, root / "ink", rank=8, seed=2, alpha=16, targets=("to_q", "to_v")),
    }
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01not a safetensors file" * 10)
    files["corrupt"] = corrupt
    import torch

    # Well-formed, for another model: its factors do not fit the tiny transformer's layers.
    other = root / "other.safetensors"
    save_file(
        {
            "transformer.layers.0.attention.to_q.lora_A.weight": torch.randn(4, 3840),
            "transformer.layers.0.attention.to_q.lora_B.weight": torch.randn(3840, 4),
        },
        str(other),
    )
    files["other"] = other
    return files


def _loras(files: dict[str, Path], *names: str, **scales: float) -> list[dict[str, Any]]:
    return [{"name": name, "source": str(files[name]), "scale": scales.get(name, 1.0)} for name in names]


def _settings(model: Path, **values: Any) -> Settings:
    base: dict[str, Any] = {"model": str(model), "device": "cpu", "warmup_sizes": ["256x256"], "min_size": 64}
    return Settings(_env_file=None, **{**base, **values})


def _image(runner: PipelineRunner, adapters: tuple[tuple[str, float], ...] = (), seed: int = 3) -> np.ndarray:
    spec = BatchSpec([PROMPT], [seed], 256, 256, 2, adapters=adapters)
    return np.asarray(runner.generate(spec).images[0], dtype=np.int16)


@pytest.fixture(scope="module")
def runner(tiny_model_dir: Path, adapter_files: dict[str, Path]) -> PipelineRunner:
    loaded = PipelineRunner(_settings(tiny_model_dir, loras=_loras(adapter_files, "pixel", "ink")))
    loaded.load()
    return loaded


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path) -> PipelineRunner:
    """A runner with no adapters configured: the base model as the server serves it without."""
    loaded = PipelineRunner(_settings(tiny_model_dir))
    loaded.load()
    return loaded


def test_an_adapter_changes_the_image_as_diffusers_loads_it(
    runner: PipelineRunner, plain: PipelineRunner, adapter_files: dict[str, Path], tiny_model_dir: Path
) -> None:
    base = _image(runner)
    for name in ("pixel", "ink"):
        changed = _image(runner, ((name, 1.0),))
        assert pixel_difference(changed, base).mean() > 5, f"{name} does not change the image visibly"
    # The reference: diffusers' own load_lora_weights and set_adapters on a fresh pipeline.
    reference = PipelineRunner(_settings(tiny_model_dir))
    reference.load()
    reference.pipe.load_lora_weights(str(adapter_files["pixel"].parent), adapter_name="pixel")
    reference.pipe.load_lora_weights(str(adapter_files["ink"].parent), adapter_name="ink")
    for selection in ((("pixel", 1.0),), (("ink", 0.6),), (("ink", 0.5), ("pixel", 1.0))):
        reference.pipe.set_adapters([name for name, _ in selection], [scale for _, scale in selection])
        expected = _image(reference)
        found = _image(runner, selection)
        assert pixel_difference(found, expected).mean() < 0.5, f"{selection} differs from diffusers' result"
        assert pixel_difference(found, base).mean() > 5


def test_scale_zero_and_no_adapter_give_the_base_image_exactly(
    runner: PipelineRunner, plain: PipelineRunner
) -> None:
    without = _image(plain)
    assert np.array_equal(_image(runner), without)
    _image(runner, (("pixel", 1.0),))  # swapped in, then out again
    assert np.array_equal(_image(runner, (("pixel", 0.0),)), without)
    assert np.array_equal(_image(runner, (("ink", 0.0), ("pixel", 0.0))), without)
    assert np.array_equal(_image(runner), without)


def test_the_scale_moves_the_image_between_the_base_and_the_adapter(runner: PipelineRunner) -> None:
    base = _image(runner)
    full = _image(runner, (("pixel", 1.0),))
    half = _image(runner, (("pixel", 0.5),))
    away = _image(runner, (("pixel", -1.0),))
    assert 1 < pixel_difference(half, base).mean() < pixel_difference(full, base).mean()
    assert pixel_difference(away, base).mean() > 1
    assert pixel_difference(away, full).mean() > 1


def test_a_swap_is_a_copy_of_what_is_on_the_device(runner: PipelineRunner) -> None:
    bank = runner.adapters
    assert bank.rank == 12  # the two largest ranks side by side
    swaps = bank.swaps
    bank.activate((("ink", 1.0),))
    bank.activate((("ink", 1.0),))  # already there: nothing to do
    assert bank.swaps == swaps + 1
    assert bank.last_swap_seconds < 0.1


def test_bad_adapter_files_fail_at_load_with_a_message_and_the_rest_serve(
    tiny_model_dir: Path, adapter_files: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "two").mkdir()
    for name in ("a", "b"):
        (tmp_path / "two" / f"{name}.safetensors").write_bytes(adapter_files["pixel"].read_bytes())
    loras = [
        *_loras(adapter_files, "pixel", "corrupt", "other"),
        {"name": "missing", "source": str(tmp_path / "nowhere.safetensors")},
        {"name": "pickled", "source": str(tmp_path / "weights.bin")},
        {"name": "two", "source": str(tmp_path / "two")},
        {"name": "big", "source": str(adapter_files["ink"])},
    ]
    (tmp_path / "weights.bin").write_bytes(b"pickle")
    runner = PipelineRunner(_settings(tiny_model_dir, loras=loras, lora_max_rank=4))
    runner.load()
    failed = runner.adapters.failed
    assert list(runner.adapters.adapters) == ["pixel"]
    assert "cannot be read as LoRA weights" in failed["corrupt"]
    assert "is it for this model?" in failed["other"]
    assert "does not exist" in failed["missing"]
    assert "not a .safetensors file" in failed["pickled"]
    assert "holds 2 .safetensors files" in failed["two"]
    assert "rank 8 is above the ceiling 4" in failed["big"]
    assert pixel_difference(_image(runner, (("pixel", 1.0),)), _image(runner)).mean() > 5


@pytest.mark.slow
def test_switching_adapters_under_compile_compiles_nothing(
    tiny_model_dir: Path, adapter_files: dict[str, Path], runner: PipelineRunner, tmp_path: Path
) -> None:
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    tuned = PipelineRunner(
        _settings(
            tiny_model_dir,
            compile=True,
            compile_cache_dir=str(tmp_path / "cc"),
            loras=_loras(adapter_files, "pixel", "ink"),
        )
    )
    tuned.load()
    for spec in tuned.warmup_specs():
        tuned.generate(spec)
    compiled = counters["frames"]["ok"]
    for selection in (
        (("pixel", 1.0),),
        (("ink", 0.7),),
        (("ink", 1.0), ("pixel", -0.5)),
        (),
        (("pixel", 0.2),),
    ):
        found = _image(tuned, selection)
        assert pixel_difference(found, _image(runner, selection)).mean() < 2.0, selection
    assert counters["frames"]["ok"] == compiled, "switching adapters compiled something"


# -- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture
def lora_server(serve: ServerFactory, adapter_files: dict[str, Path]) -> RunningServer:
    loras = _loras(adapter_files, "pixel", "ink", "corrupt", ink=0.5)
    return serve(loras=loras, batch_wait_ms=300)


def _post(server: RunningServer, **body: Any) -> httpx.Response:
    payload = {"prompt": PROMPT, "size": "256x256", "num_inference_steps": 2, "seed": 5, **body}
    return httpx.post(f"{server.url}{GEN}", json=payload, timeout=60)


def _png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_a_batch_of_mixed_requests_gives_each_its_own_adapter(lora_server: RunningServer) -> None:
    choices: list[list[dict[str, Any]] | None] = [
        [{"name": "pixel"}],
        [{"name": "ink", "scale": 1.0}],
        None,
        [{"name": "pixel", "scale": 1.0}, {"name": "ink", "scale": 1.0}],
    ] * 2
    alone = [_png(_post(lora_server, lora=choice)) for choice in choices[:4]]
    assert all(pixel_difference(alone[i], alone[j]).mean() > 3 for i in range(4) for j in range(i))
    batches = lora_server.metrics()["zimage_batch_size_count"]
    with ThreadPoolExecutor(len(choices)) as pool:
        together = list(pool.map(lambda choice: _png(_post(lora_server, lora=choice)), choices))
    for index, image in enumerate(together):
        # A batch's numbers may differ from a lone image's in the last bits, never by an adapter.
        differences = [pixel_difference(image, reference).mean() for reference in alone]
        assert differences[index % 4] < 0.5, f"request {index} strays from its own image"
        assert sorted(differences)[1] > 3, f"request {index} is close to another's adapters"
    # Same adapters, same batch: the eight requests ran in four batches, one per adapter set.
    assert lora_server.metrics()["zimage_batch_size_count"] - batches == 4


def test_an_adapter_named_as_the_model_is_that_adapter_at_its_scale(lora_server: RunningServer) -> None:
    by_model = _png(_post(lora_server, model="ink"))
    assert np.array_equal(by_model, _png(_post(lora_server, lora=[{"name": "ink", "scale": 0.5}])))
    assert not np.array_equal(by_model, _png(_post(lora_server, lora=[{"name": "ink", "scale": 1.0}])))


def test_the_openai_client_lists_and_uses_the_adapters(lora_server: RunningServer) -> None:
    client = OpenAI(base_url=f"{lora_server.url}/v1", api_key="unused", max_retries=0)
    models = {model.id: model for model in client.models.list()}
    assert list(models) == ["z-image-turbo", "pixel", "ink"]  # the corrupt one did not load
    assert models["ink"].model_extra == {"parent": "z-image-turbo", "lora": {"scale": 0.5, "rank": 8}}
    result = client.images.generate(
        prompt=PROMPT,
        size="256x256",
        extra_body={"seed": 5, "num_inference_steps": 2, "lora": [{"name": "pixel", "scale": 1.0}]},
    )
    assert result.data is not None
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert np.array_equal(
        np.asarray(image.convert("RGB"), dtype=np.int16), _png(_post(lora_server, lora=[{"name": "pixel"}]))
    )
    metrics = lora_server.metrics()
    assert metrics['zimage_adapter_requests_total{adapter="pixel"}'] == 2
    assert metrics['zimage_adapter_images_generated_total{adapter="pixel"}'] == 2
    load = httpx.get(f"{lora_server.url}/load").json()["adapters"]
    assert load["loaded"] == ["pixel", "ink"]
    assert "cannot be read as LoRA weights" in load["failed"]["corrupt"]


@pytest.mark.parametrize(
    ("lora", "model", "param", "words"),
    [
        (
            [{"name": "sketch"}],
            None,
            "lora[0].name",
            "adapter 'sketch' is not served here; the adapters are: corrupt, ink, pixel",
        ),
        ([{"name": "pixel", "scale": 2.5}], None, "lora[0].scale", "scale must be between -2 and 2, got 2.5"),
        ([{"name": "pixel"}, {"name": "pixel"}], None, "lora[1]", "adapter 'pixel' is named twice"),
        ([{"name": "ink"}], "ink", "lora[0]", "adapter 'ink' is named twice"),
        ([{"name": "corrupt"}], None, "lora", "adapter 'corrupt' failed to load when the server started"),
        ([{"name": "pixel"}, {"name": "ink"}, {"name": "corrupt"}], None, "lora", "failed to load"),
        (None, "sketch", "model", "use 'z-image-turbo', an adapter (corrupt, ink, pixel)"),
    ],
)
def test_bad_adapter_requests_get_a_400_that_names_the_fix(
    lora_server: RunningServer, lora: Any, model: str | None, param: str, words: str
) -> None:
    body: dict[str, Any] = {"lora": lora} if lora is not None else {}
    if model is not None:
        body["model"] = model
    response = _post(lora_server, **body)
    assert response.status_code == (404 if param == "model" else 400), response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert lora_server.metrics().get("zimage_images_generated_total", 0) == 0


@pytest.mark.parametrize(
    "lora",
    [
        {"name": "pixel"},
        [{"name": 3}],
        [{"name": "pixel", "scale": "1"}],
        [{"name": "pixel", "weight": 1}],
        [{}],
    ],
)
def test_malformed_adapter_lists_are_refused_as_bad_input(lora_server: RunningServer, lora: Any) -> None:
    response = _post(lora_server, lora=lora)
    assert response.status_code == 400, response.text
    assert "lora" in json.dumps(response.json()["error"])


def test_too_many_adapters_for_the_server_are_refused(
    serve: ServerFactory, adapter_files: dict[str, Path]
) -> None:
    server = serve(loras=_loras(adapter_files, "pixel", "ink"), lora_max_per_request=1)
    response = _post(server, lora=[{"name": "pixel"}, {"name": "ink"}])
    assert response.status_code == 400
    assert "combines at most 1 (lora_max_per_request)" in response.json()["error"]["message"]
    assert _post(server, lora=[{"name": "ink"}]).status_code == 200


def test_adapter_settings_are_checked_before_start(
    adapter_files: dict[str, Path], tiny_model_dir: Path
) -> None:
    from pydantic import ValidationError

    source = str(adapter_files["pixel"])
    cases = [
        ([{"name": "Pixel Art", "source": source}], "use 1 to 63 lower-case letters"),
        ([{"name": "a", "source": source}, {"name": "a", "source": source}], "the name 'a' is given twice"),
        ([{"name": "a", "source": "s3://bucket/a.safetensors"}], "unsupported adapter source"),
        ([{"name": "a", "source": "hf://owner"}], "hf://OWNER/NAME[/FILE][@REVISION]"),
        ([{"name": "a", "source": source, "scale": 9}], "scale must be between -2 and 2"),
        ([{"name": "z-image-turbo", "source": source}], "is also a served model name"),
        ([{"name": "a", "path": source}], "Extra inputs are not permitted"),
    ]
    for loras, words in cases:
        with pytest.raises(ValidationError, match=words.replace("[", r"\[").replace("]", r"\]")):
            _settings(tiny_model_dir, loras=loras)


def test_adapters_come_from_the_environment_or_a_flag_as_json(
    adapter_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from zimage_server.core.config import load_settings

    loras = _loras(adapter_files, "pixel", pixel=0.8)
    monkeypatch.setenv("ZIMAGE_LORAS", json.dumps(loras))
    assert [adapter.model_dump() for adapter in load_settings([]).loras] == loras
    monkeypatch.delenv("ZIMAGE_LORAS")
    flagged = load_settings(["--loras", json.dumps(loras), "--lora-max-per-request", "1"])
    assert [adapter.name for adapter in flagged.loras] == ["pixel"]
    assert flagged.lora_max_per_request == 1


def test_the_published_schema_names_the_adapters_and_the_limits(lora_server: RunningServer) -> None:
    schema = httpx.get(f"{lora_server.url}/openapi.json").json()["components"]["schemas"]
    lora = schema["ImageGenerationRequest"]["properties"]["lora"]["anyOf"][0]
    assert lora["maxItems"] == 2  # lora_max_per_request
    assert lora["items"]["properties"]["name"]["enum"] == ["pixel", "ink", "corrupt"]
    scale = lora["items"]["properties"]["scale"]["anyOf"][0]
    assert (scale["minimum"], scale["maximum"]) == (-2.0, 2.0)


def test_a_kohya_style_file_is_read_as_its_diffusers_twin(
    runner: PipelineRunner, adapter_files: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The same factors saved as trainers outside diffusers save them (``diffusion_model.``
    prefix, ``lora_down``/``lora_up``, an ``alpha`` per module): the same image."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(adapter_files["ink"]))  # rank 8, lora_alpha 16
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, part = key.removeprefix("transformer.").rpartition(".lora_")
        name = "lora_down" if part.startswith("A") else "lora_up"
        converted[f"diffusion_model.{module}.{name}.weight"] = tensor
        converted[f"diffusion_model.{module}.alpha"] = torch.tensor(16.0)
    kohya = tmp_path / "ink-kohya.safetensors"
    save_file(converted, str(kohya))
    loras = [{"name": "ink", "source": str(kohya)}]
    other = PipelineRunner(_settings(tiny_model_dir, loras=loras))
    other.load()
    assert other.adapters.failed == {}
    found = _image(other, (("ink", 1.0),))
    assert pixel_difference(found, _image(runner, (("ink", 1.0),))).mean() < 0.5
    assert pixel_difference(found, _image(runner)).mean() > 3
