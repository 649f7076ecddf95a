"""API keys as text: one per line in a key file, or also comma-separated in ``api_keys``.

Read where the settings are checked (a key file that holds no key stops the server) and by the
key ring that guards the images API."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)


def parse_keys(text: str, commas: bool = True) -> frozenset[str]:
    """Keys one per line, or also comma-separated (``api_keys``; a key file is lines only, so a
    key may hold a comma); blanks ignored."""
    return frozenset(key.strip() for key in re.split(r"[,\n]" if commas else r"\n", text) if key.strip())


def read_key_file(path: str | os.PathLike[str]) -> frozenset[str]:
    """The keys in ``path``; ``ValueError`` saying what is wrong when it has none or cannot be read."""
    try:
        keys = parse_keys(Path(path).read_text(encoding="utf-8"), commas=False)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"api_keys_file {str(path)!r} cannot be read: {type(exc).__name__}") from None
    if not keys:
        raise ValueError(f"api_keys_file {str(path)!r} holds no key")
    if any("," in key for key in keys):
        logger.warning(
            "a key in api_keys_file holds a comma: keys there are one per line, the comma is part of "
            "the key (put several keys on lines of their own)"
        )
    return keys
