"""The fast PNG writer: any decoder must read back exactly the pixels it was given."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from zimage_server.core.encoding import encode_image
from zimage_server.core.png import encode_png


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("mode", "shape"),
    [
        ("RGB", (1024, 1024, 3)),
        ("RGBA", (17, 33, 4)),
        ("L", (5, 7)),
        ("RGB", (1, 1, 3)),
        ("RGB", (3, 640, 3)),
    ],
)
@pytest.mark.parametrize("slices", [1, 3, 8])
def test_pixels_survive_the_round_trip(mode: str, shape: tuple[int, ...], slices: int) -> None:
    pixels = np.random.default_rng(len(shape) + slices).integers(0, 256, shape, dtype=np.uint8)
    decoded = _decode(encode_png(Image.fromarray(pixels, mode), slices=slices))
    assert decoded.format == "PNG"
    assert decoded.mode == mode
    assert np.array_equal(np.asarray(decoded), pixels)


def test_a_smooth_image_is_compressed() -> None:
    axis = np.linspace(0, 255, 512)
    pixels = np.stack([np.add.outer(axis, axis) / 2] * 3, -1).astype(np.uint8)
    data = encode_png(Image.fromarray(pixels))
    assert len(data) < pixels.nbytes / 4
    assert np.array_equal(np.asarray(_decode(data)), pixels)


def test_other_modes_are_converted_to_rgb() -> None:
    image = Image.new("P", (8, 8), 3)
    image.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 756)
    decoded = _decode(encode_png(image))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (70, 80, 90)


def test_both_png_encoders_give_the_same_pixels() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    fast = _decode(encode_image(image, "png", 90, 1, "fast"))
    pillow = _decode(encode_image(image, "png", 90, 1, "pillow"))
    assert np.array_equal(np.asarray(fast), np.asarray(pillow))
