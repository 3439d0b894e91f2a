"""Synthetic media that hit or miss the server's caches on purpose.

A "pool" item is the same bytes every time it is drawn (so the server's media cache, encoder
cache and image-keyed prefix cache can hit); a "unique" item differs from every other in its
pixels (its content hash, hence every cache, misses). Images are JPEG (cheap to make at
1080p); videos are short MPEG-4 clips made with PyAV."""

from __future__ import annotations

import base64
import io
from functools import lru_cache

import numpy as np
from PIL import Image

SIZES = {"224": (224, 224), "720p": (1280, 720), "1080p": (1920, 1080)}


@lru_cache(maxsize=16)
def _base(w: int, h: int, seed: int) -> np.ndarray:
    """Smooth content (gradients + blocks), so resizing on the server does real work."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def image_bytes(w: int, h: int, seed: int, unique_id: int | None = None) -> bytes:
    """JPEG of a w x h image; `unique_id` stamps a distinct pattern into a corner block."""
    arr = _base(w, h, seed)
    if unique_id is not None:
        arr = arr.copy()
        rng = np.random.default_rng(1_000_003 + unique_id)
        side = max(min(w, h) // 8, 8)
        arr[:side, :side] = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def video_bytes(w: int, h: int, frames: int, fps: int, seed: int, unique_id: int | None = None) -> bytes:
    """An MPEG-4 clip of a square moving over a still background."""
    import av

    base = _base(w, h, seed)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as box:
        stream = box.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        rng = np.random.default_rng(2_000_003 + (unique_id if unique_id is not None else -1))
        colour = rng.integers(0, 256, 3, dtype=np.uint8)
        side = max(min(w, h) // 6, 8)
        for i in range(frames):
            arr = base.copy()
            x = (i * (w - side)) // max(frames - 1, 1)
            arr[h // 2 - side // 2: h // 2 + side // 2, x: x + side] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()
