"""Bad input gets a 4xx in the OpenAI error shape with a message that says what to change."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import RunningServer

GEN = "/v1/images/generations"
JSON = {"Content-Type": "application/json"}

# (case id, path, body (dict -> JSON, bytes/str -> raw), status, param, words the message must hold)
CASES: list[tuple[str, str, Any, int, str | None, str]] = [
    (
        "size-not-multiple-of-16",
        GEN,
        {"prompt": "x", "size": "1000x1000"},
        400,
        "size",
        "multiples of 16; try 992x992",
    ),
    ("size-too-small", GEN, {"prompt": "x", "size": "32x32"}, 400, "size", "between 64 and 2048"),
    ("size-too-large", GEN, {"prompt": "x", "size": "4096x4096"}, 400, "size", "between 64 and 2048"),
    ("size-malformed", GEN, {"prompt": "x", "size": "large"}, 400, "size", "look like '1024x1024'"),
    ("size-wrong-type", GEN, {"prompt": "x", "size": 1024}, 400, "size", "valid string"),
    ("n-zero", GEN, {"prompt": "x", "n": 0}, 400, "n", "between 1 and 4"),
    ("n-too-large", GEN, {"prompt": "x", "n": 50}, 400, "n", "between 1 and 4"),
    ("n-not-an-integer", GEN, {"prompt": "x", "n": "two"}, 400, "n", "valid integer"),
    ("prompt-missing", GEN, {"size": "256x256"}, 400, "prompt", "'prompt' is required"),
    ("prompt-empty", GEN, {"prompt": ""}, 400, "prompt", "the prompt is empty"),
    ("prompt-blank", GEN, {"prompt": "   \n"}, 400, "prompt", "the prompt is empty"),
    ("prompt-too-long", GEN, {"prompt": "x" * 4001}, 400, "prompt", "the limit is 4000"),
    ("prompt-not-a-string", GEN, {"prompt": 42}, 400, "prompt", "valid string"),
    (
        "response-format-url",
        GEN,
        {"prompt": "x", "response_format": "url"},
        400,
        "response_format",
        "use 'b64_json'",
    ),
    (
        "response-format-unknown",
        GEN,
        {"prompt": "x", "response_format": "xml"},
        400,
        "response_format",
        "b64_json",
    ),
    (
        "output-format-unknown",
        GEN,
        {"prompt": "x", "output_format": "gif"},
        400,
        "output_format",
        "'png', 'jpeg' or 'webp'",
    ),
    (
        "steps-zero",
        GEN,
        {"prompt": "x", "num_inference_steps": 0},
        400,
        "num_inference_steps",
        "between 1 and 50",
    ),
    (
        "steps-too-many",
        GEN,
        {"prompt": "x", "num_inference_steps": 500},
        400,
        "num_inference_steps",
        "made for 8",
    ),
    ("seed-negative", GEN, {"prompt": "x", "seed": -1}, 400, "seed", "greater than or equal to 0"),
    ("seed-not-a-number", GEN, {"prompt": "x", "seed": "lucky"}, 400, "seed", "valid integer"),
    (
        "compression-out-of-range",
        GEN,
        {"prompt": "x", "output_compression": 101},
        400,
        "output_compression",
        "100",
    ),
    (
        "unknown-field-typo",
        GEN,
        {"prompt": "x", "num_inference_step": 4},
        400,
        "num_inference_step",
        "unknown parameter",
    ),
    ("unknown-model", GEN, {"prompt": "x", "model": "dall-e-3"}, 404, "model", "use 'z-image-turbo'"),
    ("body-not-json", GEN, b"prompt=a+fox", 400, None, "not valid JSON"),
    ("body-truncated-json", GEN, b'{"prompt": "a fox"', 400, None, "not valid JSON"),
    ("body-json-array", GEN, b'["a fox"]', 400, None, "must be a JSON object"),
    ("body-empty", GEN, b"", 400, None, "JSON"),
    ("body-invalid-utf8", GEN, b'{"prompt": "\xff\xfe"}', 400, None, "not valid JSON"),
    (
        "body-nested-deep",
        GEN,
        b'{"prompt": "x", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        400,
        None,
        "not valid JSON",
    ),
    ("body-number-huge", GEN, b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", 400, None, "not valid JSON"),
    (
        "size-fullwidth-digits",
        GEN,
        {"prompt": "x", "size": "\uff15\uff11\uff12x512"},
        400,
        "size",
        "look like",
    ),
    ("size-trailing-newline", GEN, {"prompt": "x", "size": "512x512\n"}, 400, "size", "look like"),
    (
        "size-far-out-of-range",
        GEN,
        {"prompt": "x", "size": "99999x99999"},
        400,
        "size",
        "between 64 and 2048",
    ),
    ("body-json-without-content-type", "/generate", "FORM", 400, None, "Content-Type: application/json"),
    ("generate-n-above-one", "/generate", {"prompt": "x", "n": 2}, 400, "n", "use /v1/images/generations"),
    ("generate-size-bad", "/generate", {"prompt": "x", "size": "100x100"}, 400, "size", "try 96x96"),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_with_a_useful_message(
    server: RunningServer, path: str, body: Any, status: int, param: str | None, words: str
) -> None:
    if isinstance(body, dict):
        response = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    elif body == "FORM":  # what `curl -d '{...}'` sends without -H 'Content-Type: application/json'
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        response = httpx.post(f"{server.url}{path}", content=b'{"prompt": "x"}', headers=form, timeout=30)
    else:
        response = httpx.post(f"{server.url}{path}", content=body, headers=JSON, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert words in error["message"]
    if "JSON" in words and status == 400:
        assert error["code"] in ("invalid_json", "invalid_body")
    assert "Traceback" not in response.text


def test_bad_input_loses_nothing(server: RunningServer) -> None:
    """After a burst of bad requests the server still serves, and none of them reached the GPU."""
    for _, path, body, *_ in CASES:
        if isinstance(body, dict):
            httpx.post(f"{server.url}{path}", json=body, timeout=30)
    good = httpx.post(f"{server.url}/generate", json={"prompt": "fine", "size": "256x256"}, timeout=30)
    assert good.status_code == 200
    metrics = server.metrics()
    assert metrics["zimage_images_generated_total"] == 1
    assert metrics.get('zimage_requests_total{route="/v1/images/generations",status="500"}', 0) == 0


def test_unknown_route_and_method_answer_in_the_error_shape(server: RunningServer) -> None:
    missing = httpx.get(f"{server.url}/v1/images/edits")
    assert missing.status_code == 404
    assert "no route GET /v1/images/edits" in missing.json()["error"]["message"]
    wrong_method = httpx.get(f"{server.url}{GEN}")
    assert wrong_method.status_code == 405
    assert "not allowed" in wrong_method.json()["error"]["message"]
