"""Request and response bodies of the images API (the OpenAI shape plus ``seed`` and steps)."""

from __future__ import annotations

import unicodedata
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

OutputFormat = Literal["png", "jpeg", "webp"]

MEDIA_TYPES: dict[str, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
MAX_SEED = 2**63 - 1


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations`` and ``POST /generate``.

    Limits that depend on the server's settings (size range, ``n``, steps, prompt length) are
    checked by the service, which knows them; this model checks types and shapes.
    """

    model_config = ConfigDict(extra="forbid")

    # minLength for the published schema; the check (and its message) is check_prompt_text.
    prompt: StrictStr = Field(description="What to draw", json_schema_extra={"minLength": 1})
    model: StrictStr | None = Field(None, description="Served model name; optional")
    n: StrictInt = Field(1, description="Number of images")
    size: StrictStr | None = Field(None, description="'WIDTHxHEIGHT', multiples of 16, or 'auto'")
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat | None = None
    output_compression: StrictInt | None = Field(None, ge=0, le=100, description="JPEG/WebP quality 0-100")
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED, description="Same seed, same image")
    num_inference_steps: StrictInt | None = Field(None, description="Denoising steps (Turbo: 8)")
    # Accepted for compatibility with OpenAI clients; they do not change the result.
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = None
    style: Literal["vivid", "natural"] | None = None
    user: StrictStr | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_is_text(cls, value: str) -> str:
        return check_prompt_text(value)

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_alias(cls, value: object) -> object:
        return "jpeg" if value == "jpg" else value


# Categories that draw nothing: separators, controls, format characters (zero-width space,
# joiners, direction marks), and private, unassigned or surrogate code points.
_INVISIBLE = ("Z", "C")


def check_prompt_text(value: str) -> str:
    """``value`` if it is well-formed Unicode with at least one visible character."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the prompt holds an unpaired UTF-16 surrogate at character {exc.start}; "
            "send well-formed Unicode text"
        ) from None
    if not any(unicodedata.category(char)[0] not in _INVISIBLE for char in value):
        raise ValueError("the prompt is empty; describe the image to generate")
    return value


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
