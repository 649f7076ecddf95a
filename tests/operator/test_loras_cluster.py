"""spec.loras on the local cluster: two adapters (one on a claim, one a file in the image) and
a corrupt third; real tiny-model servers load them, the official openai client picks each
through the Service with extra_body, and the status lists what the replica loaded and says
which one failed and why."""

from __future__ import annotations

import base64
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from kubernetes import client
from openai import OpenAI
from PIL import Image

from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import LocalPodRunner
from tests.server.lora_files import make_adapter
from zimage_server.pipeline.tiny_model import ensure_tiny_model

from .test_artifacts_cluster import _claim
from .test_operator_cluster import apply, condition, get, service_address, wait_for, zis

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _image(result: Any) -> np.ndarray:
    assert result.data is not None
    data = base64.b64decode(result.data[0].b64_json or "")
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_a_service_with_two_adapters_serves_each_and_reports_them(
    operator: LocalPodRunner,
    pod_runner: LocalPodRunner,
    cluster: LocalCluster,
    api: client.ApiClient,
    namespace: str,
) -> None:
    _claim(cluster, namespace, "adapters")
    on_claim = pod_runner.workdir / "claims" / f"{namespace}_adapters"
    model = ensure_tiny_model()
    make_adapter(model, on_claim / "pixel", rank=4, seed=1)
    (on_claim / "broken.safetensors").write_bytes(b"not an adapter at all" * 8)
    # "In the image": outside /tmp, which is the pod's own emptyDir.
    image_files = Path(tempfile.mkdtemp(prefix="zimage-adapters-", dir="/var/tmp"))
    ink = make_adapter(model, image_files / "ink", rank=8, seed=2)
    spec: dict[str, Any] = {
        "model": {"source": "builtin://tiny"},
        "loras": [
            {"name": "pixel", "source": "pvc://adapters/pixel"},
            {"name": "ink", "source": f"file://{ink}", "scale": 0.9},
            {"name": "broken", "source": "pvc://adapters/broken.safetensors"},
        ],
        "runtime": {"warmupSizes": ["256x256"]},
        "autoscaling": {"mode": "none"},
    }
    try:
        result = apply(cluster, namespace, zis("styled", **spec))
        assert result.returncode == 0, result.stderr

        address = service_address(pod_runner, namespace, "styled")
        openai = OpenAI(base_url=f"http://{address}/v1", api_key="unused", max_retries=0, timeout=120)
        models = {entry.id: entry for entry in openai.models.list()}
        assert list(models) == ["z-image-turbo", "pixel", "ink"]
        assert models["ink"].model_extra == {"parent": "z-image-turbo", "lora": {"scale": 0.9, "rank": 8}}

        def generate(**extra: Any) -> np.ndarray:
            body = {"seed": 7, "num_inference_steps": 2, **extra}
            return _image(openai.images.generate(prompt="a harbour at dawn", size="256x256", extra_body=body))

        base = generate()
        pixel = generate(lora=[{"name": "pixel", "scale": 1.0}])
        ink_image = generate(lora=[{"name": "ink"}])
        assert np.abs(pixel - base).mean() > 3
        assert np.abs(ink_image - base).mean() > 3
        assert np.abs(pixel - ink_image).mean() > 3
        refused = httpx.post(
            f"http://{address}/v1/images/generations",
            json={"prompt": "x", "size": "256x256", "lora": [{"name": "broken"}]},
            timeout=30,
        )
        assert refused.status_code == 400
        assert "failed to load" in refused.json()["error"]["message"]

        def reported() -> dict[str, Any] | None:
            body = get(api, namespace, "styled")
            adapters = (body.get("status") or {}).get("adapters") or {}
            degraded = condition(body, "Degraded")
            if adapters.get("loaded") != ["pixel", "ink"] or degraded.get("reason") != "AdapterLoadFailed":
                return None
            return {"adapters": adapters, "degraded": degraded}

        found = wait_for(reported, 60, "status.adapters and Degraded AdapterLoadFailed")
        (pod,) = found["adapters"]["pods"]
        assert found["adapters"]["pods"][pod] == ["pixel", "ink"]
        (failure,) = found["adapters"]["failed"]
        assert failure["name"] == "broken"
        assert failure["pod"] == pod
        assert "cannot be read as LoRA weights" in failure["reason"]
        assert f"adapter broken on {pod}" in found["degraded"]["message"]
        assert condition(get(api, namespace, "styled"), "Ready")["status"] == "True"

        # Without the broken one the service is healthy again.
        apply(cluster, namespace, zis("styled", **{**spec, "loras": spec["loras"][:2]}))
        wait_for(
            lambda: condition(get(api, namespace, "styled"), "Degraded").get("status") == "False" or None,
            180,
            "Degraded False once the broken adapter is gone",
        )
    finally:
        cluster.kubectl("delete", "zis", "styled", "-n", namespace, "--wait=true", check=False)
        cluster.kubectl("delete", "pv", f"{namespace}-adapters", "--wait=false", check=False)
        shutil.rmtree(image_files, ignore_errors=True)
