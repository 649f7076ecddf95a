"""Bad input gets a 4xx in the OpenAI error shape with a message that says what to change."""

from __future__ import annotations

import json
import re
import socket
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
    (
        "prompt-variation-selectors",
        GEN,
        {"prompt": "\ufe0f\ufe0e \U000e0100"},
        400,
        "prompt",
        "the prompt is empty",
    ),
    ("prompt-tag-characters", GEN, {"prompt": "\U000e0068\U000e0069"}, 400, "prompt", "the prompt is empty"),
    (
        "prompt-emoji-alone",
        GEN,
        {"prompt": "\U0001f98a\U0001f332"},
        400,
        "prompt",
        "emoji alone do not count",
    ),
    ("prompt-hangul-filler", GEN, {"prompt": "\u3164\u2800"}, 400, "prompt", "the prompt is empty"),
    ("size-leading-zero", GEN, {"prompt": "x", "size": "0512x512"}, 400, "size", "look like"),
    (
        "background-transparent",
        GEN,
        {"prompt": "x", "background": "transparent"},
        400,
        "background",
        "background 'transparent' is not supported",
    ),
    ("moderation-auto", GEN, {"prompt": "x", "moderation": "auto"}, 400, "moderation", "moderation 'auto'"),
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
    missing = httpx.get(f"{server.url}/v1/images/variations")
    assert missing.status_code == 404
    assert "no route GET /v1/images/variations" in missing.json()["error"]["message"]
    wrong_method = httpx.get(f"{server.url}{GEN}")
    assert wrong_method.status_code == 405
    assert "not allowed" in wrong_method.json()["error"]["message"]


@pytest.mark.parametrize(
    "extra",
    [
        {"size": "256X256"},
        {"prompt": "\U0001f98a a fox"},  # beside a visible character, an emoji is part of a prompt
        {"background": "opaque"},
        {"background": "auto"},
        {"moderation": "low"},
    ],
)
def test_what_the_schema_admits_is_served(server: RunningServer, extra: dict[str, Any]) -> None:
    body = {"prompt": "x", "size": "256x256", "num_inference_steps": 1, **extra}
    response = httpx.post(f"{server.url}{GEN}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    schema = httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]["ImageGenerationRequest"]
    for name, value in extra.items():
        published = schema["properties"][name]
        if name == "prompt":
            assert re.search(published["pattern"], value)
        elif name == "size":
            assert re.fullmatch(published["anyOf"][0]["pattern"], value)
        else:
            assert value in published["anyOf"][0]["enum"]


def test_random_seeds_are_exact_in_javascript(server: RunningServer) -> None:
    body = {"prompt": "x", "size": "64x64", "num_inference_steps": 1, "n": 4}
    seeds = [
        item["seed"]
        for _ in range(5)
        for item in httpx.post(f"{server.url}{GEN}", json=body, timeout=60).json()["data"]
    ]
    assert all(0 <= seed < 2**53 for seed in seeds), seeds
    assert len(set(seeds)) == len(seeds)


def test_no_third_party_pages_and_no_redirect_built_from_the_host(server: RunningServer) -> None:
    for page in ("/docs", "/redoc"):
        assert httpx.get(f"{server.url}{page}").status_code == 404
    assert httpx.get(f"{server.url}/openapi.json").status_code == 200
    slashed = httpx.get(f"{server.url}/metrics/", headers={"Host": "evil.example"})
    assert slashed.status_code == 404
    assert "location" not in slashed.headers


def test_a_head_over_64_kib_is_431_in_the_error_shape(server: RunningServer) -> None:
    for size in (98 * 1024, 116 * 1024):  # whole in one read, as a client sends it
        response = httpx.get(f"{server.url}/v1/models", headers={"X-Padding": "p" * size})
        assert response.status_code == 431, size
        assert response.json()["error"]["code"] == "request_header_too_large"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        for _ in range(100):  # in pieces that never end the head
            sock.sendall(b"X-Padding: " + b"p" * 1000 + b"\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), head
    assert b"application/json" in head
    assert json.loads(body)["error"]["code"] == "request_header_too_large"


def test_a_malformed_request_is_a_json_400(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost x\r\n\r\n")
        answer = sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["error"]["code"] == "invalid_http"
