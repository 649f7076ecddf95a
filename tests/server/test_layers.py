"""The server's layers are its folders: each imports only the layers below it, nothing imports
in a circle (imports inside functions included), each folder says what it may import, and the
settings are read without importing torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import zimage_server

PACKAGE = Path(zimage_server.__file__).parent
# Bottom to top; the CLI (zimage_server.cli, __main__) stands on all of them.
LAYERS = ("core", "pipeline", "engine", "health", "http")


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every zimage_server module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("zimage_server")}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import; the layers read better absolute"
            if node.module and node.module.startswith("zimage_server"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(
                        child
                        if (PACKAGE.parent / child.replace(".", "/")).with_suffix(".py").exists()
                        else node.module
                    )
    return found


def _layer(module: str) -> int:
    if module == "zimage_server":
        return 0  # the package itself holds only its version
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return len(LAYERS)  # the package's top: cli, __main__, __init__


GRAPH = {_module(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_lives_in_a_layer_folder() -> None:
    loose = sorted(name for name in GRAPH if _layer(name) == len(LAYERS))
    assert loose == ["zimage_server.__main__", "zimage_server.cli"]
    root = ast.parse((PACKAGE / "__init__.py").read_text())
    assert not [node for node in ast.walk(root) if isinstance(node, ast.Import | ast.ImportFrom)]


def test_no_layer_imports_a_layer_above_it() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_no_module_imports_in_a_circle() -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(" -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for target in GRAPH.get(module, ()):
            if target in GRAPH and target != module:
                visit(target, [*path, module])
        done.add(module)

    for module in GRAPH:
        visit(module, [])


def test_each_folder_says_what_it_may_import_and_that_is_what_it_imports() -> None:
    for index, layer in enumerate(LAYERS):
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text())) or ""
        assert "May import:" in doc, layer
        declared = doc.split("May import:", 1)[1]
        below = LAYERS[:index]
        for other in LAYERS:
            named = f"``{other}``" in declared
            assert named == (other in below), f"{layer}'s docstring on {other}"


def test_settings_are_read_and_checked_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "from zimage_server.core.config import load_settings\n"
        "load_settings(['--attention-backend', '_native_flash', '--vram-limit', '90%'])\n"
        "print(sorted(name for name in ('torch', 'diffusers', 'transformers') if name in sys.modules))\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("ZIMAGE_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_attention_backends_the_settings_take_are_diffusers_own() -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName

    from zimage_server.core.choices import ATTENTION_BACKENDS

    assert tuple(backend.value for backend in AttentionBackendName) == ATTENTION_BACKENDS
