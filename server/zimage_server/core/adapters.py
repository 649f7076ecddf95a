"""LoRA adapters as the settings and requests name them: a name, a source and a default scale;
what a request asks for (names and scales). Checked without torch; loading them is the
pipeline's (``pipeline.adapters``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Lower-case letters, digits, '-', '.' and '_', starting and ending with a letter or digit: a
# name that is safe in a URL, a metric label and a Kubernetes field alike.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9._]{0,61}[a-z0-9])?$"
NAME_RE = re.compile(NAME_PATTERN)
# A scale multiplies the adapter's change to the weights: 0 is the base model, 1 the adapter as
# trained, a negative scale pushes away from it.
MIN_SCALE = -2.0
MAX_SCALE = 2.0
# The file the diffusers LoRA format is saved as, looked for in a folder or a Hub repository.
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
HF_RE = re.compile(r"hf://([^/@\s]+)/([^/@\s]+)((?:/[^@\s]+)?)(?:@([^\s]+))?")

Selection = tuple[tuple[str, float], ...]  # (name, scale) pairs, by name: a batch's adapters


class AdapterSourceError(ValueError):
    """An adapter's source cannot be read as one; the message says what to write."""


@dataclass(frozen=True)
class AdapterSource:
    scheme: str  # file | hf
    location: str  # a path (a file or a folder), or OWNER/NAME
    filename: str | None = None  # hf: the file in the repository (default: DEFAULT_WEIGHT_NAME)
    revision: str | None = None

    @classmethod
    def parse(cls, source: str) -> AdapterSource:
        source = source.strip()
        if source.startswith("hf://"):
            match = HF_RE.fullmatch(source)
            if not match:
                raise AdapterSourceError(
                    f"an hf:// adapter source is hf://OWNER/NAME[/FILE][@REVISION], got {source!r}"
                )
            owner, name, filename, revision = match.groups()
            return cls("hf", f"{owner}/{name}", filename.lstrip("/") or None, revision or None)
        if source.startswith("file://"):
            path = source.removeprefix("file://")
            if not path.startswith("/"):
                raise AdapterSourceError(f"a file:// adapter source is file:///ABSOLUTE/PATH, got {source!r}")
            return cls("file", path)
        if "://" in source or not source:
            raise AdapterSourceError(
                f"unsupported adapter source {source!r}: use a path, file:///PATH or hf://OWNER/NAME[/FILE]"
            )
        return cls("file", source)

    def __str__(self) -> str:
        if self.scheme == "hf":
            name = f"hf://{self.location}" + (f"/{self.filename}" if self.filename else "")
            return name + (f"@{self.revision}" if self.revision else "")
        return self.location


def check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            f"adapter name {value!r}: use 1 to 63 lower-case letters, digits, '-', '.' or '_', "
            "starting and ending with a letter or digit"
        )
    return value


def check_scale(value: float, what: str = "scale") -> float:
    if not MIN_SCALE <= value <= MAX_SCALE:
        raise ValueError(f"{what} must be between {MIN_SCALE:g} and {MAX_SCALE:g}, got {value:g}")
    return float(value)


class AdapterSetting(BaseModel):
    """One adapter the server loads at start: ``{"name": ..., "source": ..., "scale": 1.0}``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="What requests call it")
    source: str = Field(
        description="A .safetensors file or a folder holding one, file:///PATH or hf://OWNER/NAME[/FILE]"
    )
    scale: float = Field(1.0, description="The scale a request that names no scale gets")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        AdapterSource.parse(value)
        return value

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: float) -> float:
        return check_scale(value)


def check_adapter_list(adapters: list[AdapterSetting]) -> None:
    seen: set[str] = set()
    for adapter in adapters:
        if adapter.name in seen:
            raise ValueError(f"loras: the name {adapter.name!r} is given twice")
        seen.add(adapter.name)
