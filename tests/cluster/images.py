"""The Dockerfile's images, built here with BuildKit for the local cluster's kubelet node.

No registry is reachable and no Docker engine runs, so:
- the base image (``BASE_IMAGE`` in the Dockerfile) is a Debian bookworm file system made with
  debootstrap, with Python 3.11 as ``python`` and its venv module, written as an OCI image
  layout; BuildKit takes it as a named build context
  (``context:debian-base=oci-layout://...@sha256:...``), so the Dockerfile stays as it is;
- buildkitd (built from its Go module by ``build-binaries.sh``) runs with the runc worker and the
  host network for the ``RUN pip install`` steps; its state, and so its layer cache, lives in
  ``~/.cache/zimage/buildkit``, and the base file system in ``~/.cache/zimage/images``;
- the result is a docker-archive tar that ``LocalCluster.import_image`` loads into containerd.

    python -m tests.cluster.images [server] [operator]   # prints the archives' paths
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .local_cluster import build_binaries

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ZIMAGE_IMAGE_CACHE", Path.home() / ".cache" / "zimage"))
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
IMAGE_PREFIX = "zimage.local"
TAG = "dev"
# Where this machine's HTTPS goes through a proxy with its own CA, pip in the build needs the
# bundle; it is passed as a build secret, not kept in the image.
CA_BUNDLE = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")


def image_name(target: str) -> str:
    return f"{IMAGE_PREFIX}/zimage-{target}:{TAG}"


def base_layout() -> tuple[Path, str]:
    """The Debian base as an OCI image layout (debootstrap, once per package list), cached;
    returns the layout's folder and its manifest's digest.

    BuildKit takes it as a named context by that digest (``oci-layout://...@sha256:...``): a
    content-addressed image, so the cache of every step above it holds from one build to the
    next. A local folder as the base did not: its first step ran again on every build."""
    key = hashlib.sha256(" ".join((SUITE, *BASE_PACKAGES)).encode()).hexdigest()[:12]
    layout = CACHE / "images" / f"debian-{SUITE}-{key}.oci"
    index = layout / "index.json"
    if index.is_file():
        return layout, json.loads(index.read_text())["manifests"][0]["digest"]
    if shutil.which("debootstrap") is None:
        raise RuntimeError("building the base image needs debootstrap: run `make node-packages`")
    partial = layout.with_suffix(".partial")
    shutil.rmtree(partial, ignore_errors=True)
    rootfs = partial / "rootfs"
    rootfs.mkdir(parents=True)
    started = time.monotonic()
    debootstrap = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE]
    subprocess.run(
        [*debootstrap, str(rootfs)],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    # Nothing of the host's apt state or caches in the image.
    for folder in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / folder).glob("*"):
            if entry.is_file():
                entry.unlink()
    blobs = partial / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layer = partial / "layer.tar"
    subprocess.run(
        ["tar", "--numeric-owner", "--xattrs", "--sort=name", "-C", str(rootfs), "-cf", str(layer), "."],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(rootfs)
    layer_digest = _file_digest(layer)
    layer_size = layer.stat().st_size
    layer.rename(blobs / layer_digest)
    config = {
        "architecture": GO_ARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created_by": " ".join(debootstrap)}],
    }
    config_descriptor = _blob(blobs, "application/vnd.oci.image.config.v1+json", config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_descriptor,
        "layers": [{"mediaType": LAYER_TYPE, "digest": f"sha256:{layer_digest}", "size": layer_size}],
    }
    manifest_descriptor = _blob(blobs, "application/vnd.oci.image.manifest.v1+json", manifest)
    manifest_descriptor["annotations"] = {"org.opencontainers.image.ref.name": SUITE}
    (partial / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (partial / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_descriptor]}))
    partial.rename(layout)
    print(f"debootstrap {SUITE} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return layout, manifest_descriptor["digest"]


LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
# Go's names for the machine's architecture, as OCI image configs use them.
GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _blob(blobs: Path, media_type: str, document: dict[str, Any]) -> dict[str, Any]:
    """Write a JSON document into the layout's blobs; return its descriptor."""
    data = json.dumps(document, sort_keys=True).encode()
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


@contextlib.contextmanager
def buildkitd(binaries: Path) -> Iterator[str]:
    """A buildkitd for one build session; yields its address."""
    state = CACHE / "buildkit"
    state.mkdir(parents=True, exist_ok=True)
    address = f"unix:///run/zimage-buildkit-{os.getpid()}.sock"
    log = (state / "buildkitd.log").open("ab")
    process = subprocess.Popen(
        [
            str(binaries / "buildkitd"),
            f"--root={state / 'root'}",
            f"--addr={address}",
            "--oci-worker=true",
            "--containerd-worker=false",
            "--oci-worker-binary=runc",
            "--oci-worker-net=host",
            "--oci-worker-snapshotter=overlayfs",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(
            [str(binaries / "buildctl"), f"--addr={address}", "debug", "workers"], capture_output=True
        ).returncode:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"buildkitd did not start; see {state / 'buildkitd.log'}")
            time.sleep(0.2)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()
        with contextlib.suppress(FileNotFoundError):
            Path(address.removeprefix("unix://")).unlink()


# What the Dockerfile copies from the build context (its `source` stage, constraints.txt).
CONTEXT_INPUTS = ("Dockerfile", "pyproject.toml", "constraints.txt", "README.md", "server", "operator")
# The layer cache kept after a build. The server image needs about 20 GB of it: its
# dependencies' layer (8 GB), its copy in the image and that copy compressed.
KEEP_STORAGE_MB = 30000


def inputs_key(target: str, base: str, binaries: Path) -> str:
    """A digest of everything a target's image is made from: the context files the Dockerfile
    copies, the base file system and the BuildKit build. An archive made from the same inputs
    is not built again (exporting the server image's 3 GB takes minutes, even from cache)."""
    digest = hashlib.sha256(f"{target} {base} {binaries.name}".encode())
    for name in CONTEXT_INPUTS:
        top = ROOT / name
        for path in sorted([top] if top.is_file() else top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in str(path):
                digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def build(targets: list[str], out: Path | None = None) -> dict[str, Path]:
    """Build each Dockerfile target; return its docker-archive tar (named ``image_name``)."""
    binaries = build_binaries()
    layout, base = base_layout()
    out = out or CACHE / "images"
    out.mkdir(parents=True, exist_ok=True)
    archives = {}
    keys = {target: inputs_key(target, base, binaries) for target in targets}
    for target in targets:
        archive = out / f"zimage-{target}.tar"
        stamp = archive.with_suffix(".inputs")
        if archive.is_file() and stamp.is_file() and stamp.read_text() == keys[target]:
            archives[target] = archive
    wanted = [target for target in targets if target not in archives]
    if not wanted:
        return archives
    with buildkitd(binaries) as address:
        for target in wanted:
            archive = out / f"zimage-{target}.tar"
            stamp = archive.with_suffix(".inputs")
            stamp.unlink(missing_ok=True)
            partial = archive.with_suffix(".partial")
            command = [
                str(binaries / "buildctl"),
                f"--addr={address}",
                "build",
                "--progress=plain",
                "--frontend=dockerfile.v0",
                f"--local=context={ROOT}",
                f"--local=dockerfile={ROOT}",
                f"--opt=target={target}",
                "--opt=build-arg:BASE_IMAGE=debian-base",
                f"--opt=context:debian-base=oci-layout://debian-base@{base}",
                f"--oci-layout=debian-base={layout}",
                f"--output=type=docker,name={image_name(target)},dest={partial}",
            ]
            if CA_BUNDLE.is_file():
                command.append(f"--secret=id=pip-ca,src={CA_BUNDLE}")
            started = time.monotonic()
            run = subprocess.run(command, capture_output=True, text=True, timeout=3600)
            if run.returncode:
                raise RuntimeError(f"building the {target} image failed:\n{run.stderr[-6000:]}")
            partial.rename(archive)
            stamp.write_text(keys[target])
            archive.with_suffix(".log").write_text(run.stderr)  # BuildKit's steps, with their times
            print(
                f"built {image_name(target)} in {time.monotonic() - started:.0f}s: {archive}", file=sys.stderr
            )
            archives[target] = archive
        # BuildKit keeps every layer it made; without a bound its state grew past 60 GB here.
        subprocess.run(
            [str(binaries / "buildctl"), f"--addr={address}", "prune", f"--keep-storage={KEEP_STORAGE_MB}"],
            check=True,
            capture_output=True,
        )
    return {target: archives[target] for target in targets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.images")
    # Checked here, not with choices=: argparse checks an empty or default list as one value.
    parser.add_argument("targets", nargs="*", help="operator, server (default: both)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.targets) - {"operator", "server"})
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}: choose from operator, server")
    # A SIGTERM still stops buildkitd: the exit runs the clean-up of build()'s context manager.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for target, archive in build(args.targets or ["operator", "server"]).items():
        print(f"{image_name(target)} {archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
