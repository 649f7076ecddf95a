"""``stream: true`` on /v1/images/generations: partial images, then each image, as server-sent
events the official ``openai`` client reads; they batch with other requests."""

from __future__ import annotations

import base64
import io
import json
import threading
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent
from PIL import Image

from zimage_server.pipeline.partials import clean_estimate, partial_steps

from .conftest import SLOW, RunningServer, ServerFactory, pixel_difference

URL = "/v1/images/generations"


def read_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of every event in a text/event-stream body."""
    events = []
    for block in response.text.split("\n\n"):
        lines = [line for line in block.splitlines() if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        events.append((fields.get("event", ""), json.loads(fields["data"])))
    return events


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_partial_steps_are_evenly_spaced_inside_the_run() -> None:
    assert partial_steps(8, 3) == [2, 4, 6]
    assert partial_steps(8, 1) == [4]
    assert partial_steps(8, 2) == [2, 5]
    assert partial_steps(8, 0) == []
    assert partial_steps(4, 3) == [1, 2]  # fewer partials than asked: not enough steps
    assert partial_steps(2, 3) == []


def test_the_clean_estimate_inverts_an_euler_step() -> None:
    import torch

    clean, noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma, sigma_next = 0.8, 0.5
    before = (1 - sigma) * clean + sigma * noise
    after = (1 - sigma_next) * clean + sigma_next * noise  # the step a perfect model takes
    assert torch.allclose(clean_estimate(before, after, sigma, sigma_next), clean, atol=1e-5)


def test_a_stream_sends_partial_images_then_the_same_image_as_without_stream(server: RunningServer) -> None:
    body = {"prompt": "a red fox", "size": "128x128", "num_inference_steps": 8, "seed": 11}
    with httpx.stream(
        "POST", server.url + URL, json={**body, "stream": True, "partial_images": 2}, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        response.read()
    events = read_events(response)
    assert [name for name, _ in events] == ["image_generation.partial_image"] * 2 + [
        "image_generation.completed"
    ]
    partials = [data for name, data in events if name.endswith("partial_image")]
    assert [p["partial_image_index"] for p in partials] == [0, 1]
    completed = events[-1][1]
    assert completed["type"] == "image_generation.completed"
    assert completed["size"] == "128x128"
    assert completed["output_format"] == "png"
    assert completed["usage"]["input_tokens"] > 0
    final = decode(completed["b64_json"])
    assert final.size == (128, 128)

    plain = httpx.post(server.url + URL, json=body, timeout=120).json()["data"][0]
    assert base64.b64decode(plain["b64_json"]) == base64.b64decode(completed["b64_json"])
    # The partial images are the clean image as estimated along the way: real images of the
    # size asked, nearer the final one the later they come.
    first, second = (np.asarray(decode(p["b64_json"]).convert("RGB")) for p in partials)
    assert first.shape == second.shape == (128, 128, 3)
    assert (
        pixel_difference(second, final.convert("RGB")).mean()
        <= pixel_difference(first, final.convert("RGB")).mean()
    )
    metrics = server.metrics()
    assert metrics["zimage_partial_image_duration_seconds_count"] == 2
    # Decoding the partials is not a step: 7 timed steps each (the first one holds the text
    # encoder), with and without them.
    assert metrics["zimage_step_duration_seconds_count"] == 14


def test_the_official_client_streams_unchanged(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    stream = client.images.generate(
        model=server.settings.served_model_names[0],
        prompt="a lighthouse",
        size="128x128",
        stream=True,
        partial_images=3,
        output_format="jpeg",
        extra_body={"num_inference_steps": 8, "seed": 3},
    )
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    partials = [event for event in events if isinstance(event, ImageGenPartialImageEvent)]
    assert [event.partial_image_index for event in partials] == [0, 1, 2]
    final = events[-1]
    assert isinstance(final, ImageGenCompletedEvent)
    assert final.output_format == "jpeg"
    assert final.size == "128x128"
    assert base64.b64decode(final.b64_json).startswith(b"\xff\xd8")  # a JPEG
    assert final.usage.input_tokens > 0


def test_streams_batch_with_other_requests_and_each_gets_its_own_images(serve: ServerFactory) -> None:
    server = serve(max_batch_size=4, batch_wait_ms=3000)  # the batch starts once it holds all 4
    body = {"prompt": "a tree", "size": "128x128", "num_inference_steps": 6}
    results: dict[str, Any] = {}

    def streamed(name: str, seed: int, n: int) -> None:
        with httpx.stream(
            "POST",
            server.url + URL,
            json={**body, "seed": seed, "n": n, "stream": True, "partial_images": 1},
            timeout=120,
        ) as response:
            response.read()
        results[name] = read_events(response)

    def plain() -> None:
        results["plain"] = httpx.post(server.url + URL, json={**body, "seed": 50}, timeout=120).json()

    threads = [
        threading.Thread(target=streamed, args=("a", 10, 2)),
        threading.Thread(target=streamed, args=("b", 20, 1)),
        threading.Thread(target=plain),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    metrics = server.metrics()
    assert metrics["zimage_batch_size_count"] == 1, "the streams and the plain request ran as one batch"
    assert metrics["zimage_batch_size_sum"] == 4
    a = [data for name, data in results["a"] if name == "image_generation.completed"]
    assert sorted((d["image_index"], d["seed"]) for d in a) == [(0, 10), (1, 11)]
    assert [d["image_index"] for name, d in results["a"] if name.endswith("partial_image")] == [0, 1]
    assert [name for name, _ in results["b"]] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert results["plain"]["data"][0]["seed"] == 50


def busy_server(serve: ServerFactory) -> tuple[RunningServer, threading.Thread]:
    """A server of batches of one, busy with a long request (the thread that sent it)."""
    server = serve(max_batch_size=1, batch_wait_ms=0)
    busy = threading.Thread(
        target=httpx.post,
        args=(server.url + URL,),
        kwargs={"json": {"prompt": "busy", **SLOW}, "timeout": 120},
    )
    busy.start()
    server.wait_metric("zimage_in_flight_requests", lambda v: v == 1)
    return server, busy


def test_progress_events_report_queue_place_and_steps(serve: ServerFactory) -> None:
    server, busy = busy_server(serve)
    body = {
        "prompt": "next",
        "size": "64x64",
        "num_inference_steps": 3,
        "stream": True,
        "stream_progress": True,
    }
    with httpx.stream("POST", server.url + URL, json=body, timeout=120) as response:
        response.read()
    busy.join(timeout=120)
    events = read_events(response)
    names = [name for name, _ in events]
    assert names[0] == "zimage.queue"
    assert events[0][1]["position"] == 1, "it waited behind the busy request"
    assert ("zimage.queue", {"type": "zimage.queue", "position": 0}) in events
    steps = [data["step"] for name, data in events if name == "zimage.progress"]
    assert steps == [1, 2, 3]
    assert names[-1] == "image_generation.completed"


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"partial_images": 2}, "partial_images", '"stream": true'),
        ({"stream_progress": True}, "stream_progress", '"stream": true'),
        ({"stream": True, "partial_images": 4}, "partial_images", "less than or equal to 3"),
        ({"stream": "yes"}, "stream", "boolean"),
        ({"stream": True, "size": "100x96"}, "size", "16"),
    ],
)
def test_bad_stream_requests_are_refused_before_any_stream(
    server: RunningServer, body: dict[str, Any], param: str, words: str
) -> None:
    response = httpx.post(server.url + URL, json={"prompt": "a fox", **body}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


def test_generate_refuses_stream(server: RunningServer) -> None:
    response = httpx.post(server.url + "/generate", json={"prompt": "a fox", "stream": True}, timeout=30)
    assert response.status_code == 400
    assert "/v1/images/generations" in response.json()["error"]["message"]


def test_a_client_that_leaves_a_stream_frees_its_place(serve: ServerFactory) -> None:
    server, busy = busy_server(serve)
    body = {"prompt": "gone", "size": "64x64", "stream": True, "stream_progress": True}
    with httpx.stream("POST", server.url + URL, json=body, timeout=120) as response:
        first = next(response.iter_lines())
        assert first == "event: zimage.queue"
    # Closed while queued: dropped before it reaches the GPU.
    server.wait_metric('zimage_requests_cancelled_total{reason="disconnect"}', lambda v: v == 1)
    busy.join(timeout=120)
    server.wait_idle()
    assert server.metrics()["zimage_images_generated_total"] == 1
