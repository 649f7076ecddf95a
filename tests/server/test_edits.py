"""POST /v1/images/edits on the tiny model over loopback: the official openai client's
``images.edit`` with and without a mask, the unmasked pixels kept, seeds, edits and
generations sharing a batch window, every bad input's 400 (or 413), and memory that stays
flat across many edits."""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from openai import OpenAI
from PIL import Image

from zimage_server.engine.engine import BatchKey

from .conftest import RunningServer, ServerFactory, pixel_difference
from .test_bounds import closed_within, connection

EDITS = "/v1/images/edits"


def _png(image: Image.Image) -> bytes:
    data = io.BytesIO()
    image.save(data, "PNG")
    return data.getvalue()


def _source(width: int = 200, height: int = 300, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _alpha_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """OpenAI's kind of mask: opaque, with the area to edit transparent."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), box)
    return mask


def _decoded(b64: str | None) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64 or "")))
    image.load()
    return image


def _edit(server: RunningServer, files: dict[str, Any], **fields: Any) -> httpx.Response:
    data = {"prompt": "a watercolour harbour", "num_inference_steps": "2", **fields}
    return httpx.post(f"{server.url}{EDITS}", files=files, data=data, timeout=60)


def _client(server: RunningServer) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_edits_an_image_to_the_size_asked(server: RunningServer) -> None:
    source = _png(_source())
    result = _client(server).images.edit(
        image=("in.png", source, "image/png"),
        prompt="a watercolour harbour",
        size="256x256",
        n=2,
        extra_body={"seed": 4, "num_inference_steps": 4},
    )
    assert result.data is not None
    images = [_decoded(item.b64_json) for item in result.data]
    assert [image.size for image in images] == [(256, 256), (256, 256)]
    assert [item.model_extra and item.model_extra["seed"] for item in result.data] == [4, 5]
    assert images[0].tobytes() != images[1].tobytes()
    # Without a size, the image's own (in multiples of 16).
    auto = _client(server).images.edit(
        image=("in.png", source, "image/png"), prompt="x", extra_body={"num_inference_steps": 1}
    )
    assert auto.data is not None
    assert _decoded(auto.data[0].b64_json).size == (192, 304)


def test_the_same_seed_gives_the_same_edit_and_strength_moves_it(server: RunningServer) -> None:
    files = {"image": ("in.png", _png(_source(256, 256)), "image/png")}
    first = _edit(server, files, seed="9", size="256x256", strength="0.5")
    again = _edit(server, files, seed="9", size="256x256", strength="0.5")
    other_seed = _edit(server, files, seed="10", size="256x256", strength="0.5")
    stronger = _edit(server, files, seed="9", size="256x256", strength="1.0")
    images = [_decoded(r.json()["data"][0]["b64_json"]) for r in (first, again, other_seed, stronger)]
    assert images[0].tobytes() == images[1].tobytes()
    assert images[0].tobytes() != images[2].tobytes()
    source = Image.open(io.BytesIO(files["image"][1])).convert("RGB")
    # Half the strength keeps more of the image than all of it.
    assert (
        pixel_difference(images[0].convert("RGB"), source).mean()
        < pixel_difference(images[3].convert("RGB"), source).mean()
    )


def test_inpainting_keeps_every_pixel_outside_the_mask(server: RunningServer) -> None:
    source = _source(256, 256, seed=3)
    mask = _alpha_mask(256, 256, (64, 64, 192, 192))
    result = _client(server).images.edit(
        image=("in.png", _png(source), "image/png"),
        mask=("mask.png", _png(mask), "image/png"),
        prompt="a red boat",
        size="256x256",
        extra_body={"seed": 1, "num_inference_steps": 4},
    )
    assert result.data is not None
    edited = np.asarray(_decoded(result.data[0].b64_json).convert("RGB"), dtype=np.int16)
    original = np.asarray(source, dtype=np.int16)
    kept = np.asarray(mask.getchannel("A")) == 255
    outside = np.abs(edited - original)[kept]
    inside = np.abs(edited - original)[~kept]
    assert outside.max() <= 1, "a pixel outside the mask changed"
    assert inside.mean() > 10, "the masked area was not repainted"
    # A greyscale mask (white: edit) does the same.
    grey = Image.new("L", (256, 256), 0)
    grey.paste(255, (64, 64, 192, 192))
    same = _edit(
        server,
        {"image": ("in.png", _png(source), "image/png"), "mask": ("m.png", _png(grey), "image/png")},
        prompt="a red boat",
        size="256x256",
        seed="1",
        num_inference_steps="4",
    )
    assert (
        _decoded(same.json()["data"][0]["b64_json"]).tobytes() == _decoded(result.data[0].b64_json).tobytes()
    )


def test_a_streamed_edit_sends_the_edit_events(server: RunningServer) -> None:
    stream = _client(server).images.edit(
        image=("in.png", _png(_source(256, 256)), "image/png"),
        prompt="x",
        size="256x256",
        stream=True,
        partial_images=1,
        extra_body={"num_inference_steps": 6, "strength": 1.0},
    )
    events = [event.type for event in stream]
    assert events == ["image_edit.partial_image", "image_edit.completed"]


def test_edits_and_generations_in_one_batch_window_each_get_their_own(serve: ServerFactory) -> None:
    server = serve(batch_wait_ms=400)
    source = _png(_source(256, 256, seed=5))
    mask = _png(_alpha_mask(256, 256, (0, 0, 128, 256)))
    common = {"prompt": "a lighthouse", "size": "256x256", "seed": "2", "num_inference_steps": "4"}

    def generation() -> Image.Image:
        body = {**common, "seed": 2, "num_inference_steps": 4}
        response = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=60)
        return _decoded(response.json()["data"][0]["b64_json"])

    def edit(strength: str, with_mask: bool) -> Image.Image:
        files = {"image": ("in.png", source, "image/png")}
        if with_mask:
            files["mask"] = ("mask.png", mask, "image/png")
        response = _edit(server, files, **common, strength=strength)
        assert response.status_code == 200, response.text
        return _decoded(response.json()["data"][0]["b64_json"])

    kinds: list[Callable[[], Image.Image]] = [
        generation,
        lambda: edit("0.5", False),
        lambda: edit("1.0", False),
        lambda: edit("1.0", True),
    ]
    alone = [kind() for kind in kinds]
    batches = server.metrics()["zimage_batch_size_count"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda index: kinds[index % 4](), range(8)))
    for index, image in enumerate(together):
        differences = [pixel_difference(image.convert("RGB"), other.convert("RGB")).mean() for other in alone]
        assert differences[index % 4] < 0.5, f"request {index} strays from its own result"
        assert sorted(differences)[1] > 2, f"request {index} is close to another kind's result"
    # Each kind and strength its own batch: four batches for the eight requests.
    assert server.metrics()["zimage_batch_size_count"] - batches == 4


def test_an_edit_is_priced_by_the_steps_it_runs() -> None:
    assert BatchKey(256, 256, 8, (), None).work_steps == 8
    assert BatchKey(256, 256, 8, (), ("img2img", 0.5)).work_steps == 4
    assert BatchKey(256, 256, 8, (), ("inpaint", 1.0)).work_steps == 8
    assert BatchKey(256, 256, 10, (), ("img2img", 0.25)).work_steps == 3  # the last 2.5 steps, whole


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge image in its header and holds no pixel data: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _gif() -> bytes:
    data = io.BytesIO()
    Image.new("RGB", (64, 64)).save(data, "GIF")
    return data.getvalue()


IMAGE = ("in.png", _png(_source(64, 64)), "image/png")
MASK_64 = ("m.png", _png(_alpha_mask(64, 64, (0, 0, 32, 32))), "image/png")
BAD: list[tuple[str, dict[str, Any], dict[str, Any], str | None, str]] = [
    ("not-an-image", {"image": ("x.png", b"not an image at all", "image/png")}, {}, "image", "not an image"),
    ("empty-image", {"image": ("x.png", b"", "image/png")}, {}, "image", "is an empty file"),
    ("gif", {"image": ("x.gif", _gif(), "image/gif")}, {}, "image", "is GIF; send PNG, JPEG or WebP"),
    (
        "bomb",
        {"image": ("x.png", _png_header_only(60000, 60000), "image/png")},
        {},
        "image",
        "has more pixels than Pillow will open; the limit is 1048576 pixels",
    ),
    (
        "too-many-pixels",
        {"image": ("x.png", _png_header_only(2000, 2000), "image/png")},
        {},
        "image",
        "is 2000x2000 (4000000 pixels); the limit is 1048576 pixels (max_upload_pixels)",
    ),
    (
        "cut-short",
        {"image": ("x.png", _png(_source(64, 64))[:200], "image/png")},
        {},
        "image",
        "cannot be decoded",
    ),
    (
        "mask-size",
        {"image": IMAGE, "mask": ("m.png", _png(_alpha_mask(32, 32, (0, 0, 8, 8))), "image/png")},
        {},
        "mask",
        "the mask is 32x32 and the image 64x64; they must match",
    ),
    (
        "empty-mask",
        {"image": IMAGE, "mask": ("m.png", _png(Image.new("RGBA", (64, 64), (0, 0, 0, 255))), "image/png")},
        {},
        "mask",
        "the mask marks nothing to edit",
    ),
    ("two-images", {"image[]": [IMAGE, IMAGE]}, {}, "image", "2 images were sent; this server edits one"),
    ("no-image", {"mask": MASK_64}, {}, "image", "'image' is required"),
    ("strength-zero", {"image": IMAGE}, {"strength": "0"}, "strength", "must be above 0 and at most 1"),
    ("strength-big", {"image": IMAGE}, {"strength": "1.5"}, "strength", "must be above 0 and at most 1"),
    ("strength-text", {"image": IMAGE}, {"strength": "much"}, "strength", "invalid 'strength'"),
    ("unknown-field", {"image": IMAGE}, {"colour": "blue"}, "colour", "unknown parameter 'colour'"),
    ("bad-size", {"image": IMAGE}, {"size": "100x100"}, "size", "multiples of 16"),
    ("n-text", {"image": IMAGE}, {"n": "two"}, "n", "invalid 'n'"),
    ("partials-without-stream", {"image": IMAGE}, {"partial_images": "1"}, "partial_images", "needs"),
    ("lora-on-an-edit", {"image": IMAGE}, {"lora": "[]"}, "lora", "unknown parameter 'lora'"),
    ("extra-file", {"image": IMAGE, "style": MASK_64}, {}, "style", "'style' is a file"),
]


@pytest.mark.parametrize(("files", "fields", "param", "words"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_edits_get_a_400_that_names_the_fix(
    serve: ServerFactory, files: dict[str, Any], fields: dict[str, Any], param: str | None, words: str
) -> None:
    server = serve(max_upload_pixels=1024 * 1024)
    parts = [
        (name, value)
        for name, values in files.items()
        for value in (values if isinstance(values, list) else [values])
    ]
    data = {"prompt": "x", "num_inference_steps": "1", **fields}
    response = httpx.post(f"{server.url}{EDITS}", files=parts, data=data, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert "Traceback" not in response.text
    assert server.metrics().get("zimage_images_generated_total", 0) == 0


def test_bodies_that_are_not_forms_and_forms_past_the_bounds_are_refused(serve: ServerFactory) -> None:
    server = serve(max_edit_body_bytes=64 * 1024)
    as_json = httpx.post(f"{server.url}{EDITS}", json={"prompt": "x"}, timeout=30)
    assert as_json.status_code == 400
    assert "multipart/form-data" in as_json.json()["error"]["message"]
    big = ("big.png", _png(_source(512, 512)), "image/png")  # about 780 KB
    over = httpx.post(f"{server.url}{EDITS}", files={"image": big}, data={"prompt": "x"}, timeout=30)
    assert over.status_code == 413
    assert "65536 bytes" in over.json()["error"]["message"]
    many = [("image", IMAGE), ("mask", MASK_64), ("mask", MASK_64)]
    too_many = httpx.post(f"{server.url}{EDITS}", files=many, data={"prompt": "x"}, timeout=30)
    assert too_many.status_code == 400
    assert "Too many files" in too_many.json()["error"]["message"]
    long_field = httpx.post(
        f"{server.url}{EDITS}", files={"image": IMAGE}, data={"prompt": "x", "user": "u" * 70000}, timeout=30
    )
    assert long_field.status_code in (400, 413)
    ok = _edit(server, {"image": IMAGE}, size="256x256", num_inference_steps="1")
    assert ok.status_code == 200, "the server serves on after refusing them"


def test_a_multipart_body_that_never_ends_is_cut(serve: ServerFactory) -> None:
    server = serve(request_read_timeout_s=1.0)
    boundary = "zimage-boundary"
    with connection(server.port) as sock:
        sock.sendall(
            (
                f"POST {EDITS} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
            ).encode()
        )
        assert closed_within(sock, 5) < 3
    assert httpx.get(f"{server.url}/healthz/ready").status_code == 200


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) * 1024


@pytest.mark.slow
def test_memory_stays_flat_across_two_hundred_edits(serve: ServerFactory) -> None:
    import os

    server = serve(min_size=64, max_batch_size=4)
    files = {
        "image": ("in.png", _png(_source(512, 512)), "image/png"),
        "mask": ("m.png", _png(_alpha_mask(512, 512, (0, 0, 256, 512))), "image/png"),
    }
    fields = {"size": "64x64", "num_inference_steps": "1"}

    def edits(count: int) -> None:
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: _edit(server, files, **fields).status_code, range(count)))
        assert statuses == [200] * count

    edits(40)  # the allocator's and the caches' steady state
    before = _rss_bytes(os.getpid())
    started = time.monotonic()
    edits(200)
    after = _rss_bytes(os.getpid())
    print(
        f"200 edits in {time.monotonic() - started:.1f}s; RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
    )
    # Each upload decodes to about 1 MB (and its mask): kept, 200 would add hundreds of MiB.
    assert after - before < 40 * 2**20


def test_edits_are_documented_in_the_published_schema(server: RunningServer) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    body = document["paths"][EDITS]["post"]["requestBody"]["content"]["multipart/form-data"]
    properties = body["schema"]["properties"]
    assert properties["image"] == {**properties["image"], "type": "string", "format": "binary"}
    assert properties["strength"]["maximum"] == 1
    assert properties["n"]["maximum"] == 4
    assert "lora" not in properties
    assert json.dumps(document["paths"][EDITS]["post"]["responses"]["200"]).count("image_edit.completed") == 1


def test_the_tiny_models_edit_pipelines_share_its_modules(server: RunningServer) -> None:
    runner = server.app.state.runner
    for pipe in runner.edit_pipes.values():
        assert pipe.transformer is runner.pipe.transformer
        assert pipe.text_encoder is runner.pipe.text_encoder
        assert pipe.vae is runner.pipe.vae


def test_an_adapter_named_as_the_model_applies_to_an_edit(
    serve: ServerFactory, tiny_model_dir: Any, tmp_path: Any
) -> None:
    from .lora_files import make_adapter

    adapter = make_adapter(tiny_model_dir, tmp_path / "pixel", seed=1)
    server = serve(loras=[{"name": "pixel", "source": str(adapter)}])
    files = {"image": ("in.png", _png(_source(256, 256)), "image/png")}
    plain = _edit(server, files, size="256x256", seed="1", strength="1.0")
    styled = _edit(server, files, size="256x256", seed="1", strength="1.0", model="pixel")
    assert styled.status_code == 200, styled.text
    difference = pixel_difference(
        _decoded(plain.json()["data"][0]["b64_json"]).convert("RGB"),
        _decoded(styled.json()["data"][0]["b64_json"]).convert("RGB"),
    )
    assert difference.mean() > 3
    assert server.metrics()['zimage_adapter_requests_total{adapter="pixel"}'] == 1
