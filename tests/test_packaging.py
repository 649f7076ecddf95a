"""The Dockerfile passes the linter, and what it names exists."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = ""
    for line in DOCKERFILE.splitlines():
        match = re.match(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            current = match.group(2) or match.group(1)
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_both_targets_exist_run_as_a_numeric_user_and_name_real_entry_points() -> None:
    stages = _stages()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for target, command in (("server", "zimage-server"), ("operator", "zimage-operator")):
        body = "\n".join(stages[target])
        assert re.search(r"^USER \d+:\d+$", body, re.MULTILINE), target
        assert f'ENTRYPOINT ["{command}"]' in body, target
        module, _, function = scripts[command].partition(":")
        assert callable(getattr(importlib.import_module(module), function)), command


def test_base_images_are_pinned_by_tag() -> None:
    for line in DOCKERFILE.splitlines():
        match = re.match(r"^FROM\s+(\S+)", line)
        if match and ":" in match.group(1):
            assert not match.group(1).endswith(":latest"), line


def test_the_operator_image_installs_no_torch() -> None:
    stages = _stages()
    assert '"/src[operator]"' in "\n".join(stages["operator"])
    assert "/requirements/operator.txt" in "\n".join(stages["operator-deps"])
    operator = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"][
        "operator"
    ]
    assert not any(dependency.startswith(("torch", "diffusers")) for dependency in operator)
