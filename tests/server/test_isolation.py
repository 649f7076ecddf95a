"""One client's bad request never fails another's: text that cannot be generated from is
refused at admission, and a batch that fails anyway is run again request by request."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from zimage_server.http import protocol

from .conftest import RunningServer, ServerFactory

pytestmark = pytest.mark.slow

GEN = "/v1/images/generations"
GOOD = {"prompt": "a lighthouse at dusk", "size": "256x256", "num_inference_steps": 2}
# JSON may spell an unpaired surrogate; Python decodes it into a str no tokenizer can take.
SURROGATE = json.dumps({**GOOD, "prompt": "x\ud800"}).encode()


def _send_together(server: RunningServer, bodies: list[bytes]) -> list[httpx.Response]:
    headers = {"Content-Type": "application/json"}
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(
            pool.map(
                lambda b: httpx.post(f"{server.url}{GEN}", content=b, headers=headers, timeout=60), bodies
            )
        )


def test_one_bad_prompt_among_good_ones_fails_alone(serve: ServerFactory) -> None:
    server = serve(max_batch_size=4, batch_wait_ms=1000)
    good = [json.dumps({**GOOD, "seed": i}).encode() for i in range(3)]
    responses = _send_together(server, [SURROGATE, *good])
    assert responses[0].status_code == 400, responses[0].text
    assert "surrogate" in responses[0].json()["error"]["message"]
    assert [r.status_code for r in responses[1:]] == [200] * 3
    assert server.metrics()["zimage_images_generated_total"] == 3


@pytest.mark.parametrize(
    "prompt",
    ["\x00\x00", "\u200b\u200b", "\u200d\ufeff", " \u3000\t", "\u202e\u2066"],
    ids=["nul", "zero-width-space", "joiner-and-bom", "wide-space", "direction-marks"],
)
def test_prompts_that_draw_nothing_are_empty(server: RunningServer, prompt: str) -> None:
    response = httpx.post(f"{server.url}{GEN}", json={**GOOD, "prompt": prompt}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"
    assert "the prompt is empty" in response.json()["error"]["message"]


def test_a_batch_that_fails_is_retried_request_by_request(
    serve: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were a bad prompt to get past admission, it still fails only its own request."""
    server = serve(max_batch_size=4, batch_wait_ms=1000)
    monkeypatch.setattr(protocol, "check_prompt_text", lambda value: value)
    monkeypatch.setattr(server.app.state.runner, "check_prompt", lambda prompt: None)
    good = [json.dumps({**GOOD, "seed": i}).encode() for i in range(3)]
    responses = _send_together(server, [*good[:2], SURROGATE, good[2]])
    assert [r.status_code for r in responses] == [200, 200, 500, 200], [r.text for r in responses]
    assert responses[2].json()["error"]["type"] == "server_error"
    metrics = server.metrics()
    assert metrics["zimage_images_generated_total"] == 3
    assert metrics["zimage_batch_size_count"] == 3, "the three good requests each ran alone"
