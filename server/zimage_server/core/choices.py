"""What the settings may name that the pipeline implements: the parts that compile or replay as
CUDA graphs, and diffusers' attention backends. Kept here, without torch, so that settings are
checked without importing it (tests keep these lists equal to the pipeline's and diffusers')."""

from __future__ import annotations

COMPILABLE = ("transformer", "vae", "text_encoder")
GRAPHABLE = ("text_encoder", "transformer")
# diffusers.models.attention_dispatch.AttentionBackendName, value for value.
ATTENTION_BACKENDS = (
    "flash",
    "flash_hub",
    "flash_varlen",
    "flash_varlen_hub",
    "flash_4_hub",
    "_flash_3",
    "_flash_varlen_3",
    "_flash_3_hub",
    "_flash_3_varlen_hub",
    "aiter_fa2_hub",
    "flex",
    "native",
    "_native_cudnn",
    "_native_efficient",
    "_native_flash",
    "_native_math",
    "_native_npu",
    "_native_xla",
    "sage",
    "sage_hub",
    "sage_blackwell_hub",
    "sage_varlen",
    "_sage_qk_int8_pv_fp8_cuda",
    "_sage_qk_int8_pv_fp8_cuda_sm90",
    "_sage_qk_int8_pv_fp16_cuda",
    "_sage_qk_int8_pv_fp16_triton",
    "xformers",
)


def check_attention_backend(name: str) -> None:
    """Raise ``ValueError`` naming the choices when ``name`` is not a diffusers backend."""
    if name != "auto" and name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {name!r} is not one of: auto, {', '.join(ATTENTION_BACKENDS)}")
