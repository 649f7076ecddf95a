"""Request and response bodies of the images API (the OpenAI shape plus ``seed`` and steps)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from annotated_types import Ge, Le
from pydantic import (
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
MAX_SEED = 2**63 - 1
# Seeds the server draws stay below 2**53: a JavaScript client (the playground among them)
# holds an integer exactly only up to there, and would send back a different seed.
RANDOM_SEED_LIMIT = 2**53


def _integral(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# An integer as JSON Schema means it: 2 and 2.0, never "2", 2.5 or true.
JsonInt = Annotated[int, Strict(), BeforeValidator(_integral)]
Compression = Annotated[int, Strict(), Ge(0), Le(100), BeforeValidator(_integral)]
Seed = Annotated[int, Strict(), Ge(0), Le(MAX_SEED), BeforeValidator(_integral)]
# The OpenAI Images API allows 0 to 3 partial images per image.
MAX_PARTIAL_IMAGES = 3
PartialCount = Annotated[int, Strict(), Ge(0), Le(MAX_PARTIAL_IMAGES), BeforeValidator(_integral)]


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
    seed: Seed | None = Field(None, description="Same seed, same image")
    num_inference_steps: JsonInt | None = Field(None, description="Denoising steps (Turbo: 8)")
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


# A character that draws something: in the Basic Multilingual Plane, not whitespace, not a
# control, format, private-use or filler character (zero-width space, joiners, direction marks,
# the byte-order mark, variation selectors, the Hangul fillers, the blank Braille pattern); past
# it, anything in planes 1 to 13 (emoji, rare CJK), not the tag characters, variation selectors
# and private use of planes 14 to 16. One expression for the check and the published schema,
# read on UTF-16 code units: so ECMA 262 (JSON Schema's dialect, without the u flag) reads it as
# written, and the check hands Python the prompt with each character past the BMP as its two
# surrogates. Escapes, not the characters: the published document is JSON, which cannot hold a
# lone surrogate.
VISIBLE = (
    r"[^\s\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f"
    r"\u202a-\u202e\u2060-\u206f\u2800\u3164\ud800-\udfff\ue000-\uf8ff\ufe00-\ufe0f\ufeff\uffa0"
    r"\ufff9-\ufffb]|[\ud800-\udb3f][\udc00-\udfff]"
)
_VISIBLE = re.compile(VISIBLE)
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _surrogates(match: re.Match[str]) -> str:
    offset = ord(match.group()) - 0x10000
    return chr(0xD800 + (offset >> 10)) + chr(0xDC00 + (offset & 0x3FF))


def utf16_units(value: str) -> str:
    """``value`` with each character past the BMP spelt as its UTF-16 surrogate pair."""
    return _ASTRAL.sub(_surrogates, value)


def check_prompt_text(value: str) -> str:
    """``value`` if it is well-formed Unicode with at least one visible character."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the prompt holds an unpaired UTF-16 surrogate at character {exc.start}; "
            "send well-formed Unicode text"
        ) from None
    if _VISIBLE.search(utf16_units(value)) is None:
        raise ValueError("the prompt is empty; describe the image to generate")
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
