"""Model sources as the settings name them: ``builtin://tiny``, a directory or ``file:///PATH``,
``hf://OWNER/NAME[@REVISION]``. Parsed where the settings are checked; fetching one is the
pipeline's (``pipeline.model_source``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

BUILTIN_TINY = "builtin://tiny"


class ModelSourceError(RuntimeError):
    """The configured model cannot be found or fetched; the message says what to change."""


@dataclass(frozen=True)
class ModelSource:
    scheme: str  # builtin | file | hf
    location: str  # tiny | a path | a repo id
    revision: str | None = None

    @classmethod
    def parse(cls, source: str, default_revision: str = "main") -> ModelSource:
        source = source.strip()
        if source in ("", BUILTIN_TINY):
            return cls("builtin", "tiny")
        if source.startswith("builtin://"):
            raise ModelSourceError(f"unknown built-in model {source!r}; the only one is {BUILTIN_TINY}")
        if source.startswith("hf://"):
            repo, _, revision = source.removeprefix("hf://").partition("@")
            if repo.count("/") != 1 or not all(repo.split("/")):
                raise ModelSourceError(f"hf:// source must be hf://OWNER/NAME[@REVISION], got {source!r}")
            return cls("hf", repo, revision or default_revision)
        if source.startswith("file://"):
            return cls("file", source.removeprefix("file://"))
        if "://" in source:
            raise ModelSourceError(
                f"unsupported model source {source!r}: use builtin://tiny, a directory, file:///PATH or hf://REPO"
            )
        return cls("file", source)

    def __str__(self) -> str:
        if self.scheme == "hf":
            return f"hf://{self.location}@{self.revision}"
        if self.scheme == "builtin":
            return BUILTIN_TINY
        return self.location


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
