"""Image encoding, run on its own threads so the GPU worker never waits for compression."""

from __future__ import annotations

import io

from PIL import Image

from zimage_server.core.png import encode_png


def encode_image(
    image: Image.Image, fmt: str, quality: int, png_compress_level: int, png_encoder: str = "fast"
) -> bytes:
    if fmt == "png" and png_encoder == "fast":
        return encode_png(image)
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=png_compress_level)
    elif fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality, method=4)
    else:  # the request model admits only the three above
        raise ValueError(f"unsupported output format {fmt!r}")
    return buffer.getvalue()
