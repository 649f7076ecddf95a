"""Turn a model source string into a local directory that ``from_pretrained`` can read."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .tiny_model import ensure_tiny_model

logger = logging.getLogger(__name__)

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


def resolve(source: ModelSource, cache_dir: str | None = None, token: str | None = None) -> Path:
    """Return a local directory holding a diffusers pipeline (``model_index.json`` at its root)."""
    if source.scheme == "builtin":
        path = ensure_tiny_model()
    elif source.scheme == "file":
        path = Path(source.location).expanduser()
    else:
        path = _snapshot(source, cache_dir, token)
    if not (path / "model_index.json").is_file():
        raise ModelSourceError(f"{path} holds no diffusers pipeline (model_index.json is missing)")
    return path


def _snapshot(source: ModelSource, cache_dir: str | None, token: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = hub_offline()
    logger.info("resolving %s (offline=%s, cache=%s)", source, offline, cache_dir or "default")
    try:
        return Path(
            snapshot_download(
                repo_id=source.location,
                revision=source.revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=offline,
            )
        )
    except LocalEntryNotFoundError as exc:
        raise ModelSourceError(
            f"{source} is not in the cache {cache_dir or '(default HF cache)'} and HF_HUB_OFFLINE is set; "
            "prefetch it into the cache or unset HF_HUB_OFFLINE"
        ) from exc
