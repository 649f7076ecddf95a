"""Request and response bodies of the images API (the OpenAI shape plus ``seed`` and steps)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from annotated_types import Ge, Le
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    field_validator,
)

OutputFormat = Literal["png", "jpeg", "webp"]

MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_SEED = 2**63
# Seeds the server draws stay below 2**53: a JavaScript client (the playground among them)
# holds an integer exactly only up to there, and would send back a different seed.
RANDOM_SEED_LIMIT = 2**53


def _integral(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema means it: 2 and 2.0, never "2", 2.5 or true.
JsonInt = Annotated[int, Strict(), BeforeValidator(_integral)]
Compression = Annotated[int, Strict(), Ge(0), Le(100), BeforeValidator(_integral)]


def _seed_in_range(value: int) -> int:
    # Past MAX_SEED by less than a double's rounding, a number is MAX_SEED to a client (or a JSON
    # Schema validator) that reads JSON numbers as doubles: 9223372036854776000 is 2**63 there.
    # The seed is used as sent; the CPU generators take any seed below 2**64.
    if value > MAX_SEED and float(value) > MAX_SEED:
        raise ValueError(f"Input should be less than or equal to {MAX_SEED}")
    return value


Seed = Annotated[int, Strict(), Ge(0), AfterValidator(_seed_in_range), BeforeValidator(_integral)]
# The OpenAI Images API allows 0 to 3 partial images per image.
MAX_PARTIAL_IMAGES = 3
PartialCount = Annotated[int, Strict(), Ge(0), Le(MAX_PARTIAL_IMAGES), BeforeValidator(_integral)]


# Most adapters a request may name (the server's lora_max_per_request may allow fewer).
MAX_ADAPTERS = 8


class AdapterChoice(BaseModel):
    """One LoRA adapter a request asks for: ``{"name": "pixel-art", "scale": 0.8}``."""

    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(description="An adapter GET /v1/models lists (its 'id')")
    scale: Annotated[float, Strict()] | None = Field(
        None,
        description="How strongly it applies, -2 to 2 (0: the base model); default: the adapter's own",
    )


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations`` and ``POST /generate``.

    Limits that depend on the server's settings (size range, ``n``, steps, prompt length) are
    checked by the service, which knows them; this model checks types and shapes.
    """

    model_config = ConfigDict(extra="forbid")

    # minLength for the published schema; the check (and its message) is check_prompt_text.
    prompt: StrictStr = Field(description="What to draw", json_schema_extra={"minLength": 1})
    model: StrictStr | None = Field(None, description="Served model name; optional")
    n: JsonInt = Field(1, description="Number of images")
    size: StrictStr | None = Field(None, description="'WIDTHxHEIGHT', multiples of 16, or 'auto'")
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat | None = None
    output_compression: Compression | None = Field(None, description="JPEG/WebP quality 0-100")
    stream: StrictBool | None = Field(
        None, description="Server-sent events: partial images as the model works, then each image"
    )
    partial_images: PartialCount | None = Field(
        None, description="With stream: partial images per image, 0-3 (0 by default)"
    )
    stream_progress: StrictBool | None = Field(
        None,
        description="With stream: also 'zimage.queue' and 'zimage.progress' events (queue position, "
        "steps done); an extension the OpenAI clients do not read",
    )
    seed: Seed | None = Field(
        None, description="Same seed, same image", json_schema_extra={"maximum": MAX_SEED}
    )
    num_inference_steps: JsonInt | None = Field(None, description="Denoising steps (Turbo: 8)")
    lora: list[AdapterChoice] | None = Field(
        None,
        description="LoRA adapters to apply, each with a scale (an extension; with the openai client, "
        "extra_body). A request may also name one adapter as its 'model'",
        max_length=MAX_ADAPTERS,
    )
    # Accepted for compatibility with OpenAI clients; they do not change the result.
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: StrictStr | None = None
    # OpenAI's; the service accepts what this model honours and names any other value it refuses.
    background: StrictStr | None = Field(
        None, description="'auto' or 'opaque' (this model draws opaque images; 'transparent' is refused)"
    )
    moderation: StrictStr | None = Field(
        None, description="'low' only: this server does no content filtering, so 'auto' is refused"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_is_text(cls, value: str) -> str:
        return check_prompt_text(value)

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_alias(cls, value: object) -> object:
        return "jpeg" if value == "jpg" else value


# Characters of the Basic Multilingual Plane that draw nothing: whitespace (Python's and ECMA
# 262's), controls, format characters (zero-width space, joiners, direction marks, the byte-order
# mark, soft hyphen), variation selectors, the Hangul fillers, the blank Braille pattern, the
# surrogates and private use.
INVISIBLE = (
    (0x0000, 0x0020), (0x007F, 0x00A0), (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C),
    (0x115F, 0x1160), (0x1680, 0x1680), (0x17B4, 0x17B5), (0x180E, 0x180E), (0x2000, 0x200F),
    (0x2028, 0x202F), (0x205F, 0x206F), (0x2800, 0x2800), (0x3000, 0x3000), (0x3164, 0x3164),
    (0xD800, 0xF8FF), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF9, 0xFFFB),
)  # fmt: skip


def _visible_class() -> str:
    ranges, start = [], 0
    for low, high in INVISIBLE:
        if start < low:
            ranges.append((start, low - 1))
        start = high + 1
    ranges.append((start, 0xFFFF))
    return "[" + "".join(f"\\u{a:04x}" + (f"-\\u{b:04x}" if b > a else "") for a, b in ranges) + "]"


# A character that draws something: one of the BMP's, not INVISIBLE. Listed rather than negated,
# so that the check and the published schema's pattern are one expression that Python (on code
# points) and ECMA 262 (JSON Schema's dialect, on UTF-16 code units, without the u flag) read
# alike: neither finds a match in a character past the BMP (code point or surrogates), so such
# characters (emoji among them) do not make a prompt on their own. Escapes, not the characters:
# the published document is JSON, which cannot hold a lone surrogate.
VISIBLE = _visible_class()
_VISIBLE = re.compile(VISIBLE)


def check_prompt_text(value: str) -> str:
    """``value`` if it is well-formed Unicode with at least one visible character."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the prompt holds an unpaired UTF-16 surrogate at character {exc.start}; "
            "send well-formed Unicode text"
        ) from None
    if _VISIBLE.search(value) is None:
        raise ValueError(
            "the prompt is empty: it has no visible character (a letter, digit, punctuation mark or "
            "symbol of the Basic Multilingual Plane; emoji alone do not count); describe the image"
        )
    return value


class SingleImageRequest(ImageGenerationRequest):
    """``POST /generate``: one image, returned as its bytes (``n`` is 1)."""


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error, in the OpenAI shape."""

    error: ErrorDetail
