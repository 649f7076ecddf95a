"""The tuned pipeline path on this machine: what runs on a CPU (compile, warm-up shapes, the
fp8 layer choice, setting checks); the GPU figures are in docs/performance.md."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from zimage_server.core.choices import check_attention_backend
from zimage_server.core.config import Settings
from zimage_server.pipeline.acceleration import (
    AccelerationError,
    fp8_filter,
    quantize_fp8,
)
from zimage_server.pipeline.runner import (
    MAX_PROMPT_TOKENS,
    BatchSpec,
    PipelineRunner,
    prompt_tokens,
    prompt_window,
)

from .conftest import pixel_difference


def _settings(model: Path, **values: object) -> Settings:
    base: dict[str, object] = {"model": str(model), "device": "cpu", "warmup_sizes": ["256x256"]}
    return Settings(_env_file=None, **{**base, **values})  # type: ignore[arg-type]


def test_fp8_takes_the_main_blocks_linears_and_keeps_the_sensitive_layers(tiny_model_dir: Path) -> None:
    runner = PipelineRunner(_settings(tiny_model_dir))
    runner.load()
    transformer = runner.pipe.transformer
    chosen = [name for name, module in transformer.named_modules() if fp8_filter(module, name)]
    linears = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    # q, k, v and out of each main block; the tiny model's feed-forward width (85) is not a
    # multiple of 16, which float8 matmuls need, so those stay bf16 (the real model's 10240 is).
    assert len(chosen) == 4 * transformer.config.n_layers
    assert all(name.startswith("layers.") for name in chosen)
    assert not any("feed_forward" in name for name in chosen)
    assert fp8_filter(torch.nn.Linear(3840, 10240), "layers.0.feed_forward.w1")
    kept = set(linears) - set(chosen)
    for sensitive in ("adaLN_modulation", "noise_refiner", "context_refiner", "x_embedder", "final_layer"):
        assert any(sensitive in name for name in kept), sensitive
    assert not any("adaLN_modulation" in name for name in chosen)


def test_fp8_on_a_cpu_is_refused_with_the_reason() -> None:
    with pytest.raises(AccelerationError, match="fp8 needs an NVIDIA GPU"):
        quantize_fp8(torch.nn.Linear(16, 16), torch.device("cpu"))


def test_a_server_asked_for_fp8_on_a_cpu_fails_its_load_with_that_reason(tiny_model_dir: Path) -> None:
    runner = PipelineRunner(_settings(tiny_model_dir, precision="fp8"))
    with pytest.raises(AccelerationError, match="precision fp8 needs an NVIDIA GPU"):
        runner.load()


def test_cuda_graphs_are_off_on_a_cpu_and_refused_when_asked_for(tiny_model_dir: Path) -> None:
    runner = PipelineRunner(_settings(tiny_model_dir, compile=True))
    runner.load()
    assert runner.graphs == {}
    assert runner.tuning is not None
    assert runner.tuning.cuda_graphs == []
    asked = PipelineRunner(_settings(tiny_model_dir, cuda_graphs=True))
    with pytest.raises(AccelerationError, match="cuda_graphs needs an NVIDIA GPU"):
        asked.load()
    with pytest.raises(
        ValidationError, match="cuda_graph_parts: 'vae' is not one of text_encoder, transformer"
    ):
        _settings(tiny_model_dir, cuda_graph_parts="text_encoder,vae")


def test_the_text_encoders_ready_mask_gives_the_same_prompt_embeddings(tiny_model_dir: Path) -> None:
    """The text encoder's graphs get a 4D causal padding mask instead of the 2D padding mask
    (transformers reads the 2D one on the host, which a graph cannot capture): the same
    embeddings for prompts of different lengths, padded to one window."""
    from zimage_server.pipeline import cuda_graphs

    runner = PipelineRunner(_settings(tiny_model_dir))
    runner.load()
    pipe = runner.pipe
    prompts = ["a red fox", "a lighthouse at dusk, oil painting, wide angle, stormy sea"]
    window = prompt_window(pipe.tokenizer, prompts)

    def embeddings() -> list[torch.Tensor]:
        with torch.no_grad():
            return list(
                pipe.encode_prompt(
                    list(prompts), do_classifier_free_guidance=False, max_sequence_length=window
                )[0]
            )

    expected = embeddings()
    assert cuda_graphs.install_text_encoder(pipe.text_encoder) is not None
    found = embeddings()
    assert [item.shape for item in found] == [item.shape for item in expected]
    assert len({item.shape[0] for item in found}) == 2  # two lengths, each without its padding
    for item, reference in zip(found, expected, strict=True):
        torch.testing.assert_close(item, reference)


def test_unknown_attention_backends_and_compile_parts_are_refused_by_name(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="attention_backend 'fastest' is not one of: auto, flash"):
        check_attention_backend("fastest")
    with pytest.raises(ValidationError, match="_native_cudnn"):
        _settings(tiny_model_dir, attention_backend="cudnn")
    with pytest.raises(ValidationError, match="compile_parts: 'unet' is not one of"):
        _settings(tiny_model_dir, compile_parts="transformer,unet")
    assert _settings(tiny_model_dir, attention_backend="_native_cudnn").attention_backend == "_native_cudnn"


def test_the_operator_strings_parse(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    monkeypatch.setenv("ZIMAGE_COMPILE", "false")
    monkeypatch.setenv("ZIMAGE_PRECISION", "fp8")
    monkeypatch.setenv("ZIMAGE_ATTENTION_BACKEND", "auto")
    monkeypatch.setenv("ZIMAGE_COMPILE_CACHE_DIR", "/tmp/zimage/compile")
    settings = _settings(tiny_model_dir)
    assert (settings.compile, settings.precision, settings.attention_backend) == (False, "fp8", "auto")
    assert settings.compile_cache_dir == "/tmp/zimage/compile"


def test_compile_is_on_by_default_only_on_a_gpu(tiny_model_dir: Path) -> None:
    assert PipelineRunner(_settings(tiny_model_dir)).compile is False
    assert PipelineRunner(_settings(tiny_model_dir, compile=True)).compile is True


def test_warm_up_covers_the_shapes_requests_bring_when_compiling(tiny_model_dir: Path) -> None:
    plain = PipelineRunner(_settings(tiny_model_dir, warmup_sizes="256x256,512x512"))
    assert [(s.width, len(s.prompts)) for s in plain.warmup_specs()] == [(256, 1), (512, 1)]
    tuned = PipelineRunner(_settings(tiny_model_dir, warmup_sizes="256x256,512x512", compile=True))
    specs = tuned.warmup_specs()
    assert [(s.width, len(s.prompts)) for s in specs] == [
        (256, 1),
        (256, 1),
        (256, 4),
        (256, 4),
        (256, 4),
        (256, 2),
        (512, 1),
    ]
    assert len(specs[0].prompts[0]) != len(specs[1].prompts[0])  # another sequence length
    assert len(set(specs[2].prompts)) == 1  # batches that need no padding
    assert len(set(specs[3].prompts)) == 1
    assert len(set(specs[4].prompts)) == 2  # one that does
    assert max(map(len, specs[5].prompts)) != max(map(len, specs[4].prompts))
    # Loaded, the first prompt is lengthened to a multiple of 32 tokens (no caption padding).
    tuned.load()
    first, second = (spec.prompts[0] for spec in tuned.warmup_specs()[:2])
    tokens = prompt_tokens(tuned.pipe.tokenizer, [first, second])
    assert tokens[0] % 32 == 0
    assert tokens[1] % 32 != 0


def _matches_eager_without_compiling(
    tuned: PipelineRunner, eager: PipelineRunner, batches: list[list[str]]
) -> None:
    """Each batch of prompts, once warmed up: the compiled pipeline's images are eager's, and
    no request shape compiles anything new."""
    from torch._dynamo.utils import counters

    compiled_frames = counters["frames"]["ok"]
    for prompts in batches:
        spec = BatchSpec(prompts, list(range(len(prompts))), 256, 256, 3)
        images = tuned.generate(spec).images
        reference = eager.generate(spec).images
        for image, expected in zip(images, reference, strict=True):
            assert pixel_difference(image, expected).mean() < 2.0, "compiled output strays from eager"
    assert counters["frames"]["ok"] == compiled_frames, "a request shape was compiled after warm-up"


@pytest.mark.slow
def test_compiled_pipeline_matches_eager_and_does_not_recompile_after_warm_up(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch._dynamo.reset()  # count this pipeline's traces alone
    eager = PipelineRunner(_settings(tiny_model_dir))
    eager.load()
    tuned = PipelineRunner(_settings(tiny_model_dir, compile=True, compile_cache_dir=str(tmp_path / "cc")))
    tuned.load()
    assert tuned.tuning is not None
    assert tuned.tuning.compiled == ["transformer", "vae", "text_encoder"]
    assert (tmp_path / "cc" / "inductor").is_dir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for spec in tuned.warmup_specs():
            tuned.generate(spec)
    # The rotary embedding is real arithmetic in the compiled blocks (rotary.py).
    assert not [w for w in caught if "complex operators" in str(w.message)]
    # One trace of the block per role (with modulation or without) and kind of batch (one
    # image, several, several padded): its sequence and batch are dynamic from the first call.
    traces = _debug_get_cache_entry_list(ZImageTransformerBlock.forward.__code__)
    assert len(traces) <= 6, f"the transformer block was traced {len(traces)} times in the warm-up"
    # The text encoder's decoder layer: one prompt, or several (its length dynamic throughout).
    layer_code = type(tuned.pipe.text_encoder.layers[0]).forward.__code__
    traces = _debug_get_cache_entry_list(layer_code)
    assert len(traces) <= 2, f"the text encoder's layer was traced {len(traces)} times in the warm-up"
    prompt = "a lighthouse on a cliff at dusk, oil painting"
    other = "a photo of a red fox in fresh snow at golden hour, detailed fur, soft rim light"
    _matches_eager_without_compiling(
        tuned,
        eager,
        [[prompt], [prompt] * 3, ["short", prompt, prompt * 2], [prompt * 3], [other] * 4, [other, prompt]],
    )


@pytest.mark.slow
def test_an_unbacked_batch_traces_one_image_and_several_alike(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch._dynamo.reset()
    eager = PipelineRunner(_settings(tiny_model_dir))
    eager.load()
    tuned = PipelineRunner(
        _settings(
            tiny_model_dir,
            compile=True,
            compile_parts=["transformer"],
            compile_batch_unbacked=True,
            compile_cache_dir=str(tmp_path / "cc"),
        )
    )
    tuned.load()
    for spec in tuned.warmup_specs():
        tuned.generate(spec)
    # One trace per role (with modulation or without, padded or not), batch 1 and 4 alike: the
    # marking that leaves the batch backed needs up to 6 (the test above).
    traces = _debug_get_cache_entry_list(ZImageTransformerBlock.forward.__code__)
    assert len(traces) <= 4, f"the transformer block was traced {len(traces)} times in the warm-up"
    prompt = "a lighthouse on a cliff at dusk, oil painting"
    _matches_eager_without_compiling(
        tuned, eager, [[prompt], [prompt] * 3, ["short", prompt, prompt * 2], [prompt] * 4, [prompt, "x"]]
    )


class _AsksForOneImage(torch.nn.Module):
    """A block that branches on whether its batch is one, as PyTorch 2.11's CUDA attention
    does inside: dynamo cannot trace it with an unbacked batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out * 2 if x.shape[0] == 1 else out


def test_a_block_that_cannot_take_an_unbacked_batch_is_traced_per_batch_size_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from zimage_server.pipeline.block_compile import Marking, compile_blocks

    torch._dynamo.reset()
    model = torch.nn.Sequential(_AsksForOneImage(), _AsksForOneImage())
    one, four = torch.randn(1, 3, 8), torch.randn(4, 3, 8)
    with torch.no_grad():
        expected = [model(one), model(four)]
        marking = Marking(sequence={"x": (1,)}, batch=frozenset({"x"}), unbacked_batch=True)
        assert compile_blocks(model, ["_AsksForOneImage"], marking, fullgraph=True, backend="eager") == 2
        with caplog.at_level("WARNING", logger="zimage_server.pipeline.block_compile"):
            got = [model(one), model(four), model(one)]
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[0])
    warned = [record.getMessage() for record in caplog.records]
    assert len(warned) == 1, warned  # once for the blocks compiled together, not once per block
    assert "tracing it per batch size instead" in warned[0]
    assert "data-dependent" in warned[0]


def test_the_text_encoder_is_compiled_layer_by_layer(tiny_model_dir: Path) -> None:
    from zimage_server.pipeline.acceleration import compile_layers
    from zimage_server.pipeline.block_compile import DynamicBlockForward, GatedForward

    runner = PipelineRunner(_settings(tiny_model_dir))
    runner.load()
    text_encoder = runner.pipe.text_encoder
    assert compile_layers(text_encoder) == text_encoder.config.num_hidden_layers
    assert all(isinstance(layer.forward, DynamicBlockForward) for layer in text_encoder.layers)
    assert text_encoder._compiled_call_impl is None  # not traced whole
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert compile_layers(plain) == 0
    assert isinstance(plain.forward, GatedForward)  # no named layers: compiled whole


def test_prompts_are_encoded_at_their_own_length_with_the_same_images(tiny_model_dir: Path) -> None:
    runner = PipelineRunner(_settings(tiny_model_dir))
    runner.load()
    tokenizer = runner.pipe.tokenizer
    short, longer = "a red fox", "a red fox in fresh snow at golden hour, detailed fur " * 3
    lengths = prompt_tokens(tokenizer, [short, longer])
    for prompts, longest in (([short], lengths[0]), ([short, longer], max(lengths))):
        window = prompt_window(tokenizer, prompts)  # the batch's longest prompt decides
        assert window % 32 == 0
        assert longest < window <= longest + 32
    assert prompt_window(tokenizer, ["x" * 2000]) == MAX_PROMPT_TOKENS  # truncated as before
    spec = BatchSpec([short, longer], [3, 4], 256, 256, 2)
    images = runner.generate(spec).images
    # The pipeline's own way: every prompt padded to the full 512-token window.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in spec.seeds]
    full = runner.pipe(
        prompt=list(spec.prompts),
        height=256,
        width=256,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=generators,
        output_type="np",
        max_sequence_length=MAX_PROMPT_TOKENS,
    ).images
    for image, expected in zip(images, full, strict=True):
        assert pixel_difference(image, np.round(expected * 255)).max() <= 1
    tokenizer.padding_side = "left"  # positions would move with the padding: the full window stays
    try:
        assert prompt_window(tokenizer, [short]) == MAX_PROMPT_TOKENS
    finally:
        tokenizer.padding_side = "right"
