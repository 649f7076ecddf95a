"""API keys: with ``api_keys`` set, the images API answers only clients that send one."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from zimage_server.http import auth

from .conftest import ServerFactory

REQUEST = {"prompt": "a red fox", "size": "256x256", "num_inference_steps": 1, "seed": 1}


def test_the_images_api_needs_a_key_and_probes_do_not(serve: ServerFactory) -> None:
    server = serve(api_keys="team-a-key,team-b-key")
    missing = httpx.post(f"{server.url}/v1/images/generations", json=REQUEST, timeout=30)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
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


def _generate(url: str, headers: dict[str, str]) -> int:
    return httpx.post(f"{url}/generate", json=REQUEST, headers=headers, timeout=60).status_code


def test_keys_from_a_file_rotate_without_a_restart(
    serve: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the operator does: the Secret mounted as a file; the kubelet swaps it on rotation."""
    monkeypatch.setattr(auth, "RECHECK_S", 0.0)
    keys = tmp_path / "keys"
    keys.write_text("old-key\n")
    server = serve(api_keys_file=str(keys))
    assert _generate(server.url, {"Authorization": "Bearer old-key"}) == 200
    rotated = tmp_path / "keys.new"
    rotated.write_text("new-key\nnext-key\n")
    rotated.replace(keys)  # a new file under the old name, as the kubelet's symlink swap
    assert _generate(server.url, {"Authorization": "Bearer new-key"}) == 200
    assert _generate(server.url, {"Authorization": "Bearer old-key"}) == 401
    keys.write_text("")  # a rotation half done keeps the last good keys
    time.sleep(0.01)
    assert _generate(server.url, {"Authorization": "Bearer next-key"}) == 200


def test_a_key_may_come_as_x_api_key(serve: ServerFactory) -> None:
    server = serve(api_keys="sk-header")
    assert _generate(server.url, {"x-api-key": "sk-header"}) == 200
    assert _generate(server.url, {"x-api-key": "sk-wrong"}) == 401


def test_a_right_key_beside_a_wrong_one_is_accepted(serve: ServerFactory) -> None:
    server = serve(api_keys="sk-right")
    assert _generate(server.url, {"Authorization": "Bearer sk-stale", "x-api-key": "sk-right"}) == 200
    assert _generate(server.url, {"Authorization": "Bearer sk-right", "x-api-key": "sk-stale"}) == 200
    assert _generate(server.url, {"Authorization": "Bearer sk-stale", "x-api-key": "sk-old"}) == 401


def test_a_key_file_holds_one_key_per_line_commas_included(serve: ServerFactory, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("alpha,beta\ngamma\n")
    server = serve(api_keys_file=str(keys))
    assert _generate(server.url, {"Authorization": "Bearer alpha,beta"}) == 200
    assert _generate(server.url, {"Authorization": "Bearer gamma"}) == 200
    for part in ("alpha", "beta"):
        assert _generate(server.url, {"Authorization": f"Bearer {part}"}) == 401


def test_a_key_file_without_keys_stops_the_start(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from zimage_server.core.config import Settings

    empty = tmp_path / "keys"
    empty.write_text("\n")
    with pytest.raises(ValidationError, match="holds no key"):
        Settings(_env_file=None, api_keys_file=str(empty))
    with pytest.raises(ValidationError, match="cannot be read"):
        Settings(_env_file=None, api_keys_file=str(tmp_path / "missing"))


def test_keys_never_reach_the_log_or_the_metrics(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(api_keys="sk-very-secret")
    _generate(server.url, {"Authorization": "Bearer sk-very-secret"})
    _generate(server.url, {"Authorization": "Bearer sk-guess"})
    assert "sk-very-secret" not in httpx.get(f"{server.url}/metrics").text
    assert "sk-" not in caplog.text
