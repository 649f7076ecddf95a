"""API keys: with ``api_keys`` set, the images API answers only clients that send one."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from .conftest import ServerFactory

REQUEST = {"prompt": "a red fox", "size": "256x256", "num_inference_steps": 1, "seed": 1}


def test_the_images_api_needs_a_key_and_probes_do_not(serve: ServerFactory) -> None:
    server = serve(api_keys="team-a-key,team-b-key")
    missing = httpx.post(f"{server.url}/v1/images/generations", json=REQUEST, timeout=30)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert "Authorization: Bearer" in missing.json()["error"]["message"]

    wrong = httpx.post(
        f"{server.url}/generate", json=REQUEST, headers={"Authorization": "Bearer nope"}, timeout=30
    )
    assert wrong.status_code == 401
    assert "invalid API key" in wrong.json()["error"]["message"]

    good = httpx.post(
        f"{server.url}/generate", json=REQUEST, headers={"Authorization": "Bearer team-b-key"}, timeout=60
    )
    assert good.status_code == 200, good.text
    for path in ("/healthz/live", "/healthz/ready", "/load", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path


def test_the_openai_client_sends_its_key(serve: ServerFactory) -> None:
    server = serve(api_keys="sk-local")
    client = OpenAI(base_url=f"{server.url}/v1", api_key="sk-local", max_retries=0)
    result = client.images.generate(prompt="a fox", size="256x256", extra_body={"num_inference_steps": 1})
    assert result.data is not None
    assert len(result.data) == 1
    stranger = OpenAI(base_url=f"{server.url}/v1", api_key="sk-other", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.images.generate(prompt="a fox", size="256x256")


def test_without_keys_no_authentication_is_asked(serve: ServerFactory) -> None:
    server = serve()
    response = httpx.post(f"{server.url}/generate", json=REQUEST, timeout=60)
    assert response.status_code == 200, response.text
