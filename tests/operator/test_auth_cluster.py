"""spec.auth.apiKeySecretRef takes effect: through the Service, a real tiny-model server
refuses a client without a key and serves the official openai client that sends one (the
Secret mounted as a file, as the kubelet mounts it)."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
from kubernetes import client
from openai import OpenAI

from tests.cluster.local_cluster import LocalCluster
from tests.cluster.pod_runner import LocalPodRunner

from .test_operator_cluster import apply, service_address, zis

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REQUEST = {"prompt": "a key", "size": "256x256", "num_inference_steps": 1}


def test_a_service_with_api_keys_refuses_keyless_clients(
    operator: LocalPodRunner,
    pod_runner: LocalPodRunner,
    cluster: LocalCluster,
    api: client.ApiClient,
    namespace: str,
) -> None:
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="zimage-keys"),
        data={"keys": base64.b64encode(b"team-a-key\nteam-b-key\n").decode()},
    )
    client.CoreV1Api(api).create_namespaced_secret(namespace, secret)
    spec: dict[str, Any] = {
        "model": {"source": "builtin://tiny"},
        "runtime": {"warmupSizes": ["256x256"]},
        "autoscaling": {"mode": "none"},
        "auth": {"apiKeySecretRef": {"name": "zimage-keys"}},
    }
    apply(cluster, namespace, zis("keyed", **spec))

    address = service_address(pod_runner, namespace, "keyed", timeout=120)
    url = f"http://{address}/v1/images/generations"
    keyless = httpx.post(url, json=REQUEST, timeout=60)
    assert keyless.status_code == 401, keyless.text
    assert keyless.json()["error"]["code"] == "invalid_api_key"
    keyed = OpenAI(base_url=f"http://{address}/v1", api_key="team-b-key", max_retries=0, timeout=120)
    result = keyed.images.generate(prompt="a key", size="256x256", extra_body={"num_inference_steps": 1})
    assert result.data is not None
    assert base64.b64decode(result.data[0].b64_json or "").startswith(b"\x89PNG")
