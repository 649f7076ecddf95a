"""The published OpenAPI document is what the server does: schemathesis draws requests from it,
valid and invalid, sends them over loopback and runs every check on the answers."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.generation.modes import GenerationMode

from zimage_server.core.config import Settings

from .conftest import RunningServer
from .lora_files import make_adapter

pytestmark = pytest.mark.slow


def _png(seed: int) -> bytes:
    """A 64x64 PNG whose left half is transparent: an image to edit, and a mask of its size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    pixels[:, :32, 3] = 0
    pixels[:, 32:, 3] = 255
    data = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(data, "PNG")
    return data.getvalue()


# The edit route's files: schemathesis draws these for its image and mask parts.
schemathesis.openapi.media_type("image/png", st.integers(0, 2**16).map(_png))


@pytest.fixture(scope="module")
def contract_server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    # Small limits, so that every image a drawn request may ask for is quick to make; one
    # LoRA adapter, so that requests are drawn with it and without.
    adapter = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"), rank=2)
    server = RunningServer(
        Settings(
            _env_file=None,
            model=str(tiny_model_dir),
            device="cpu",
            min_size=64,
            max_size=128,
            default_size="64x64",
            warmup_sizes=["64x64"],
            max_n=2,
            max_steps=2,
            default_steps=1,
            max_queue=256,
            loras=[{"name": "pixel", "source": str(adapter)}],
        )
    )
    server.start()
    server.wait_ready()
    yield server
    server.stop()


def operations(server: RunningServer) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_server_does_what_its_openapi_document_says(
    contract_server: RunningServer, mode: GenerationMode
) -> None:
    """Every operation, drawn requests that fit its schema and requests that do not, every check."""
    checked = []
    for operation in operations(contract_server):
        if mode is GenerationMode.NEGATIVE and not list(operation.body):
            continue  # nothing to send that the document does not allow

        if mode is GenerationMode.NEGATIVE and operation.label == "POST /v1/images/edits":
            # schemathesis's invalid multipart bodies are not what it thinks it sent (form
            # fields carry no JSON types, so a broken rule can arrive as a valid form) and its
            # negative drawing of binary parts fails inside it; test_edits.py sends each kind
            # of invalid edit and expects its 400.
            continue

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            case.call_and_validate(timeout=60)

        check()
        checked.append(operation.label)
    assert {"POST /v1/images/generations", "POST /generate"} <= set(checked)
    if mode is GenerationMode.POSITIVE:
        assert {"GET /metrics", "GET /healthz/ready", "GET /load", "POST /v1/images/edits"} <= set(checked)
