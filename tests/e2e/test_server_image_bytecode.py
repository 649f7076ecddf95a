"""The server image holds its Python code as bytecode: the standard library's, the packages'
and the server's. The image sets ``PYTHONDONTWRITEBYTECODE`` and its files are read-only to
its user, so a module without a ``.pyc`` is compiled from source again by every process that
imports it: seconds of each new replica's start (docs/performance.md, Bytecode). Read from the
image's archive, layer by layer, as the container's file system stacks them."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path, PurePosixPath

import pytest

from tests.cluster import images

pytestmark = [pytest.mark.kubelet, pytest.mark.slow]

# Modules every server process imports, from each part of the image: the interpreter's own
# library (under /usr/lib or /usr/local/lib, whichever the base image has) and the virtual
# environment's packages.
STANDARD_LIBRARY = ("json/decoder.py", "asyncio/base_events.py", "typing.py", "dataclasses.py")
PACKAGES = (
    "torch/__init__.py",
    "torch/_dynamo/symbolic_convert.py",
    "diffusers/__init__.py",
    "transformers/__init__.py",
    "fastapi/applications.py",
)
LIBRARY = r"usr/(?:local/)?lib/python3\.\d+/"
SITE_PACKAGES = r"opt/venv/lib/python3\.\d+/site-packages/"
SERVER = "/site-packages/zimage_server/"
PYTHON_DIR = re.compile(r"python3\.(\d+)")


def image_files(archive: Path) -> set[str]:
    """The paths of the image's file system: each layer's files over the ones below it, less
    what a layer's whiteouts (``.wh.NAME``) remove."""
    files: set[str] = set()
    with tarfile.open(archive) as image:
        manifest = image.extractfile("manifest.json")
        assert manifest is not None, f"{archive} has no manifest.json"
        (entry,) = json.load(manifest)
        for layer in entry["Layers"]:
            blob = image.extractfile(layer)
            assert blob is not None
            with tarfile.open(fileobj=blob, mode="r:*") as members:
                for member in members:
                    path = PurePosixPath(member.name.removeprefix("./"))
                    if path.name.startswith(".wh."):
                        gone = str(path.parent / path.name.removeprefix(".wh."))
                        files = {name for name in files if name != gone and not name.startswith(gone + "/")}
                    elif member.isfile():
                        files.add(str(path))
    return files


def bytecode_of(source: str) -> str:
    """Where CPython reads a source file's bytecode: ``__pycache__/NAME.cpython-3XY.pyc``."""
    path = PurePosixPath(source)
    match = PYTHON_DIR.search(source)
    assert match, f"no python3.N folder in {source}"
    return str(path.parent / "__pycache__" / f"{path.stem}.cpython-3{match.group(1)}.pyc")


def one(files: set[str], pattern: str) -> str:
    found = sorted(name for name in files if re.fullmatch(pattern, name))
    assert len(found) == 1, f"the image has {found or 'no file'} for {pattern}"
    return found[0]


@pytest.fixture(scope="module")
def files() -> set[str]:
    (archive,) = images.build(["server"]).values()
    return image_files(archive)


def test_the_standard_library_and_the_packages_are_bytecode(files: set[str]) -> None:
    missing = [
        source
        for source in [one(files, LIBRARY + re.escape(name)) for name in STANDARD_LIBRARY]
        + [one(files, SITE_PACKAGES + re.escape(name)) for name in PACKAGES]
        if bytecode_of(source) not in files
    ]
    assert not missing, f"no .pyc for {missing}"


def test_every_module_of_the_server_is_bytecode(files: set[str]) -> None:
    sources = [name for name in files if SERVER in name and name.endswith(".py")]
    assert len(sources) > 10, sources
    missing = [source for source in sources if bytecode_of(source) not in files]
    assert not missing, f"no .pyc for {missing}"
