"""Compiled kernels shared between replicas: PyTorch's portable compile cache artifacts.

A replica that compiled its pipeline and warmed it up saves what it compiled
(``torch.compiler.save_cache_artifacts``: Inductor's graphs, Triton's kernels, autotuning
results) into a directory every replica mounts; the next one loads them before its warm-up
(``torch.compiler.load_cache_artifacts``), so its compiles become cache hits.

An artifact is only valid for the same GPU model, CUDA and library versions, precision,
compile parts and warm-up shapes, so its file name carries a digest of all of them; a file
with another digest is simply not looked at. Each file starts with a header holding the
payload's length and SHA-256: a partial or corrupt file is ignored with a log line, never
passed to PyTorch. A writer writes a temporary file and links it into place, which fails
when the name exists: two replicas saving at once leave one whole file, never a mixed one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import threading
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)
# PyTorch keeps its cache artifacts in process-wide state: one save or load at a time.
_TORCH_CACHE = threading.Lock()

MAGIC = b"ZIMGCCA1"
HEADER = struct.Struct(">8sQ32s")  # magic, payload length, payload SHA-256
PREFIX = "zimage-compile-"
LIBRARIES = ("torch", "diffusers", "transformers", "torchao", "triton")
# The server's modules that decide what is traced (the rotary swap, how blocks are compiled and
# their dimensions marked, the parts and their settings): a change to them is a new artifact.
TRACED_MODULES = ("acceleration.py", "block_compile.py", "rotary.py", "cuda_graphs.py")


def server_code_digest() -> str:
    digest = hashlib.sha256()
    for name in TRACED_MODULES:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class ArtifactState:
    """What this replica did with the shared artifacts: absent, loaded, ignored, saved, exists."""

    state: str = "off"
    path: str | None = None
    detail: str = ""


def identity(device: torch.device, **choices: Any) -> dict[str, Any]:
    """Everything compiled kernels depend on: the device, the versions, and ``choices``
    (precision, compile parts, warm-up shapes, ...)."""
    versions = {}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    versions["server-code"] = server_code_digest()
    found: dict[str, Any] = {"versions": versions, "choices": choices}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        found["device"] = {
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "cuda": torch.version.cuda,
            "driver": _driver_version(),
        }
    else:
        found["device"] = {"name": device.type}
    return found


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no NVML: the CUDA version and the card still key the artifact
        return "unknown"


def artifact_key(path: str | Path) -> str:
    """The artifact's key, what ``/load`` names it by: its file name less prefix and suffix (a
    client-facing answer names no file)."""
    return Path(path).stem.removeprefix(PREFIX)


def artifact_path(directory: str | Path, found: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:24]
    return Path(directory) / f"{PREFIX}{digest}.bin"


def load(path: Path) -> ArtifactState:
    """Hot-load the artifact at ``path`` into this process's compile caches, if it is whole."""
    try:
        if not path.exists():
            logger.info("no compile artifacts at %s yet: this replica compiles, then saves them", path)
            return ArtifactState("absent", str(path))
        data = path.read_bytes()
        payload = _unwrap(data)
        with _TORCH_CACHE:
            info = torch.compiler.load_cache_artifacts(payload)
    except Exception as exc:  # unreadable, corrupt, partial, or from a PyTorch that cannot read it
        logger.warning("ignoring the compile artifacts at %s: %s", path, exc)
        return ArtifactState("ignored", str(path), str(exc))
    if info is None:
        logger.warning("ignoring the compile artifacts at %s: PyTorch loaded nothing from them", path)
        return ArtifactState("ignored", str(path), "nothing loaded")
    logger.info("loaded compile artifacts from %s (%d bytes)", path, len(payload))
    return ArtifactState("loaded", str(path), f"{len(payload)} bytes")


def save(path: Path, *, replace: bool = False) -> ArtifactState:
    """Save what this process compiled to ``path``, unless another replica already did;
    ``replace``: put a whole file in place of one that was found partial or corrupt."""
    if path.exists() and not replace:
        return ArtifactState("exists", str(path))
    with _TORCH_CACHE:
        saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        logger.warning("nothing compiled to save as artifacts")
        return ArtifactState("absent", str(path), "nothing to save")
    payload = saved[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with temporary.open("wb") as file:
            file.write(HEADER.pack(MAGIC, len(payload), hashlib.sha256(payload).digest()))
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temporary, path)  # atomic: readers see the old file or the new one
        else:
            try:
                os.link(temporary, path)  # fails when the name exists: the first whole file wins
            except FileExistsError:
                return ArtifactState("exists", str(path))
    finally:
        temporary.unlink(missing_ok=True)
    logger.info("saved compile artifacts to %s (%d bytes)", path, len(payload))
    return ArtifactState("saved", str(path), f"{len(payload)} bytes")


def _unwrap(data: bytes) -> bytes:
    if len(data) < HEADER.size:
        raise ValueError(f"the file is {len(data)} bytes, shorter than its header")
    magic, length, digest = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not a compile artifact file (wrong header)")
    payload = data[HEADER.size :]
    if len(payload) != length:
        raise ValueError(f"the file holds {len(payload)} of {length} bytes (partial)")
    if hashlib.sha256(payload).digest() != digest:
        raise ValueError("the payload does not match its checksum (corrupt)")
    return payload


def _compile_time_metrics() -> dict[str, list[float]] | None:
    """PyTorch's account of its compile steps in this process, seconds per call by step
    name (``torch._dynamo.utils.compile_times`` reads the same); None where it has none."""
    from torch._dynamo import utils

    metrics = getattr(utils, "compilation_time_metrics", None)
    return metrics if isinstance(metrics, dict) else None


def compile_seconds() -> float | None:
    """Seconds this process has spent in torch.compile so far: dynamo's tracing and the
    backend's compile, or its cache lookups and loads, not the compiled code's runs. None where
    this PyTorch keeps no such account."""
    metrics = _compile_time_metrics()
    if metrics is None:
        return None
    return float(sum(metrics.get("_compile.compile_inner", ())))


def compile_time_parts(count: int = 8) -> list[tuple[str, float]]:
    """The ``count`` compile steps that took longest in this process so far, with their
    seconds (steps nest, so they overlap: tracing, the backend, its cache's loads...)."""
    metrics = _compile_time_metrics() or {}
    totals = sorted(((float(sum(times)), name) for name, times in metrics.items()), reverse=True)
    return [(name, seconds) for seconds, name in totals[:count]]


def fx_graph_lookups() -> dict[str, int]:
    """Inductor's FX graph cache lookups in this process so far: hits and misses."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return {"hit": int(inductor["fxgraph_cache_hit"]), "miss": int(inductor["fxgraph_cache_miss"])}
