"""A fast PNG writer for 8-bit RGB(A) images.

Pillow's PNG encoder picks a filter per row and runs zlib's LZ77 search; on a 1024x1024
image that takes 50-300 ms of one core. Here every row gets the ``Up`` filter (one vectorised
subtraction), zlib-ng runs with the run-length strategy (no match search), and the deflate
stream is made in slices on several threads at once (zlib lets go of the GIL): each slice
but the last ends on a byte-aligned sync flush, so the slices join into one valid stream,
which is what pigz does. The result is a standard PNG that any decoder reads, a little
larger than Pillow's at level 1 on smooth images and smaller on noisy ones.
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from zimage_server.core import background

try:  # zlib-ng writes the same deflate format about twice as fast
    from zlib_ng import zlib_ng as zlib
except ImportError:  # the server depends on zlib-ng; plain zlib writes the same format
    import zlib  # type: ignore[no-redef]

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {"RGB": 2, "RGBA": 6, "L": 0}
_UP = 2  # PNG filter type: each byte minus the byte above it
# A 1024x1024 RGB image is 3 MiB of scanlines; slices of ~400 KiB keep each thread busy enough.
SLICES = max(1, min(8, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _deflate(piece: memoryview, last: bool) -> bytes:
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    return compressor.compress(piece) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _threads() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = background.pool(SLICES, "png")
    return _pool


def filtered_rows(pixels: np.ndarray) -> bytes:
    """Scanlines of an (H, W, C) uint8 array, each led by its filter byte (``Up``)."""
    height = pixels.shape[0]
    rows = pixels.reshape(height, -1)
    out = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = _UP
    out[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=out[1:, 1:])  # uint8 arithmetic wraps, as PNG wants
    return out.tobytes()


def encode_png(image: Image.Image, slices: int = SLICES) -> bytes:
    if image.mode not in _COLOR_TYPES:
        image = image.convert("RGB")
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width = pixels.shape[:2]
    raw = filtered_rows(pixels)
    view = memoryview(raw)
    step = max(1, -(-len(raw) // max(1, slices)))
    bounds = list(range(0, len(raw), step))
    if len(bounds) == 1:
        parts = [_deflate(view, True)]
    else:
        futures = [
            _threads().submit(_deflate, view[start : start + step], start == bounds[-1]) for start in bounds
        ]
        parts = [future.result() for future in futures]
    # zlib wrapper: header for deflate with a 32 KiB window at the fastest level, then Adler-32.
    stream = b"\x78\x01" + b"".join(parts) + struct.pack(">I", zlib.adler32(raw))
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[image.mode], 0, 0, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")
