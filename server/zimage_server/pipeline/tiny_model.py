"""A tiny random-weight Z-Image pipeline built from the real classes.

The server loads it through the same ``from_pretrained`` path as the real weights, so
everything but the numbers is exercised: component classes, configs, tokenizer and chat
template, scheduler, VAE scaling. It keeps the real model's geometry where a client can see
it (16 latent channels, VAE scale factor 8 and patch size 2, so sizes are multiples of 16).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Bump when the recipe below changes, so cached copies are rebuilt.
TINY_MODEL_VERSION = "2"
TINY_SEED = 0

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(directory: Path) -> int:
    """Write a byte-level BPE tokenizer (no merges: one token per byte) and return its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=512,
    )
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return len(vocab)


def build_vae(  # type: ignore[no-untyped-def]
    block_out_channels: tuple[int, ...], layers_per_block: int, norm_num_groups: int, sample_size: int
):
    """Z-Image's VAE (the Flux type: 16 latent channels, its scaling and shift, no quant convs);
    the real one has channels (128, 256, 512, 512), 2 layers per block and 32 norm groups."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=16,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


@dataclass(frozen=True)
class Recipe:
    """A random-weight Z-Image pipeline: the three models' configurations. One recipe makes the
    built-in tiny model, another the benchmark's model of the real size (``FULL``)."""

    text_encoder: dict[str, Any]  # Qwen3Config; vocab_size comes from the tokenizer when left out
    transformer: dict[str, Any]  # ZImageTransformer2DModel; {} is Z-Image-Turbo's own config
    vae: dict[str, Any]  # build_vae
    fill_pad_tokens: bool = False  # the transformer's pad tokens are created with torch.empty


TINY = Recipe(
    text_encoder={
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    },
    transformer={
        "all_patch_size": (2,),
        "all_f_patch_size": (1,),
        "in_channels": 16,
        "dim": 32,
        "n_layers": 2,
        "n_refiner_layers": 1,
        "n_heads": 2,
        "n_kv_heads": 2,
        "cap_feat_dim": 32,  # the text encoder's hidden size
        "axes_dims": [8, 4, 4],
        "axes_lens": [1024, 128, 128],  # caption positions up to the 512-token prompt limit
    },
    vae={"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 256},
)
# Z-Image-Turbo's sizes: Qwen3-4B as the text encoder, the 6B transformer, the Flux-type VAE.
FULL = Recipe(
    text_encoder={
        "vocab_size": 151936,
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    transformer={},
    vae={
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
    },
    fill_pad_tokens=True,
)


def build_pipeline(recipe: Recipe, vocab_size: int, tokenizer_dir: Path, seed: int = TINY_SEED) -> Any:
    """The pipeline of ``recipe`` with random weights from ``seed``, on the default device and
    dtype (the caller's ``torch.device`` and ``torch.set_default_dtype``)."""
    import torch
    from diffusers import ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(**{"vocab_size": vocab_size, **recipe.text_encoder})).eval()
    transformer = ZImageTransformer2DModel(**recipe.transformer).eval()
    if recipe.fill_pad_tokens:
        for name, param in transformer.named_parameters():
            if name.endswith("pad_token"):
                torch.nn.init.normal_(param, std=0.02)
    vae = build_vae(**recipe.vae)
    return assemble_pipeline(
        text_encoder, transformer, vae, AutoTokenizer.from_pretrained(str(tokenizer_dir))
    )


def assemble_pipeline(text_encoder: Any, transformer: Any, vae: Any, tokenizer: Any) -> Any:
    """A ``ZImagePipeline`` of these parts with Z-Image-Turbo's scheduler (the tiny model's
    recipe and the benchmark's full-size one share it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
    )
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def make_tiny_model(directory: str | os.PathLike[str]) -> Path:
    """Build the tiny pipeline and save it to ``directory`` with ``save_pretrained``."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_size = build_tokenizer(Path(scratch))
        pipe = build_pipeline(TINY, vocab_size, Path(scratch))
        pipe.save_pretrained(str(target), safe_serialization=True)
    (target / "zimage_tiny.json").write_text(json.dumps({"version": TINY_MODEL_VERSION, "seed": TINY_SEED}))
    return target


def default_tiny_model_dir() -> Path:
    cache = Path(os.environ.get("ZIMAGE_CACHE_DIR") or Path.home() / ".cache" / "zimage")
    return cache / f"tiny-model-v{TINY_MODEL_VERSION}"


def ensure_tiny_model(directory: Path | None = None) -> Path:
    """Return a directory holding the tiny model, building it once if it is missing."""
    target = directory or default_tiny_model_dir()
    if (target / "zimage_tiny.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the built-in tiny model in %s", target)
    # Build beside the target and rename, so a concurrent reader never sees half a model.
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    make_tiny_model(staging)
    try:
        staging.rename(target)
    except OSError:
        # Another process won the race; its copy is identical.
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target
