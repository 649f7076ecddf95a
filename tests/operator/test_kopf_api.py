"""The operator uses Kopf's public API only: no private module, attribute or registry internals,
so that a Kopf upgrade within the pinned range cannot break it unseen."""

from __future__ import annotations

import re
from pathlib import Path

import kopf

from zimage_operator import handlers
from zimage_operator.config import OperatorSettings

PACKAGE = Path(__file__).resolve().parents[2] / "operator" / "zimage_operator"
PRIVATE = re.compile(r"\bkopf\._|\bregistry\._|\._spawning\b|\._handlers\b|\bsettings\._|\bmemo\._")


def test_no_private_kopf_name_is_used() -> None:
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not found, found


def test_the_handlers_register_with_kopfs_public_decorators_into_a_fresh_registry() -> None:
    """No daemon or timer (which Kopf gives a finalizer): only watches, indices and start-up."""
    registry = kopf.OperatorRegistry()
    handlers.register(OperatorSettings(), registry)
    source = (PACKAGE / "handlers.py").read_text()
    assert "kopf.daemon" not in source
    assert "kopf.timer" not in source
    assert len(source.splitlines()) < 150
