"""The images API over real HTTP, with the real tiny pipeline behind it."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from .conftest import RunningServer, ServerFactory


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_openai_client_generates_an_image(server: RunningServer) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    result = client.images.generate(
        model="z-image-turbo",
        prompt="a red fox in the snow",
        size="256x256",
        n=2,
        response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 2},
    )
    assert result.created > 0
    assert result.data is not None
    assert len(result.data) == 2
    images = [_decode(base64.b64decode(item.b64_json or "")) for item in result.data]
    assert all(image.format == "PNG" and image.size == (256, 256) for image in images)
    # n images get seeds seed, seed+1, ... and so differ.
    assert images[0].tobytes() != images[1].tobytes()
    assert [item.model_extra and item.model_extra["seed"] for item in result.data] == [11, 12]


def test_openai_client_sees_the_served_model(server: RunningServer) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == ["z-image-turbo"]


@pytest.mark.parametrize(
    ("output_format", "media_type", "pil_format"),
    [("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")],
)
def test_generate_returns_image_bytes(
    server: RunningServer, output_format: str, media_type: str, pil_format: str
) -> None:
    response = httpx.post(
        f"{server.url}/generate",
        json={"prompt": "a lighthouse", "size": "320x192", "output_format": output_format, "seed": 3},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == media_type
    assert response.headers["x-seed"] == "3"
    image = _decode(response.content)
    assert (image.format, image.size) == (pil_format, (320, 192))


def test_default_size_and_steps_apply(serve: ServerFactory) -> None:
    server = serve(default_size="128x128", default_steps=2)
    response = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "a cat"}, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "128x128"
    assert body["output_format"] == "png"
    assert _decode(base64.b64decode(body["data"][0]["b64_json"])).size == (128, 128)
    assert server.metrics()["zimage_step_duration_seconds_count"] >= 1


def test_same_seed_gives_the_same_image(server: RunningServer) -> None:
    def generate(seed: int) -> bytes:
        response = httpx.post(
            f"{server.url}/generate",
            json={"prompt": "a blue bicycle", "size": "256x256", "num_inference_steps": 2, "seed": seed},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return _decode(response.content).tobytes()

    first = generate(1234)
    assert generate(1234) == first
    assert generate(1235) != first


def test_a_prompt_changes_the_image(server: RunningServer) -> None:
    def generate(prompt: str) -> bytes:
        response = httpx.post(
            f"{server.url}/generate",
            json={"prompt": prompt, "size": "256x256", "num_inference_steps": 2, "seed": 5},
            timeout=30,
        )
        return _decode(response.content).tobytes()

    assert generate("a dog") != generate("a ship")


def test_metrics_expose_the_serving_families(server: RunningServer) -> None:
    httpx.post(f"{server.url}/generate", json={"prompt": "x", "size": "256x256"}, timeout=30)
    text = httpx.get(f"{server.url}/metrics").text
    for family in (
        'zimage_requests_total{route="/generate",status="200"}',
        "zimage_request_duration_seconds_bucket",
        "zimage_queue_wait_seconds_bucket",
        "zimage_queue_depth",
        "zimage_in_flight_requests",
        "zimage_batch_size_bucket",
        "zimage_images_generated_total",
        "zimage_step_duration_seconds_bucket",
        "zimage_encode_duration_seconds_bucket",
        "zimage_model_ready 1.0",
    ):
        assert family in text, family
    samples = server.metrics()
    for phase in ("load", "tune", "warmup"):
        assert samples[f'zimage_startup_seconds{{phase="{phase}"}}'] > 0, phase


def test_the_response_body_is_the_documented_shape(server: RunningServer) -> None:
    from zimage_server.http.protocol import ImageGenerationResponse

    body = {"prompt": "a kite", "size": "128x128", "n": 2, "seed": 4, "output_format": "webp"}
    response = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=30)
    parsed = ImageGenerationResponse.model_validate_json(response.content)
    assert (parsed.size, parsed.output_format, [d.seed for d in parsed.data]) == ("128x128", "webp", [4, 5])
    assert _decode(base64.b64decode(parsed.data[1].b64_json)).format == "WEBP"


def test_sliced_base64_equals_plain_base64() -> None:
    from zimage_server.http.service import b64_sliced

    for size in (0, 1, 2, 3, 3 * 2**16, 3 * 2**16 + 1, 1_000_003):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert b64_sliced(data) == base64.b64encode(data)


def test_large_images_arrive_whole(server: RunningServer) -> None:
    """Bodies above the slice size are streamed with their length; nothing is lost on the way."""
    body = {"prompt": "a wide field", "size": "1024x1024", "num_inference_steps": 1, "seed": 3}
    raw = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    assert int(raw.headers["content-length"]) == len(raw.content) > 2**19
    assert _decode(raw.content).size == (1024, 1024)
    as_json = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=60)
    assert int(as_json.headers["content-length"]) == len(as_json.content)
    assert base64.b64decode(as_json.json()["data"][0]["b64_json"]) == raw.content
