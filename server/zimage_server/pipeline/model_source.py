"""Turn a model source string into a local directory that ``from_pretrained`` can read."""

from __future__ import annotations

import logging
from pathlib import Path

from zimage_server.core.sources import ModelSource, ModelSourceError, hub_offline
from zimage_server.pipeline.tiny_model import ensure_tiny_model

logger = logging.getLogger(__name__)


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
