"""Image decoding: formats, colour modes, orientation, the malformed-media corpus, the decoded
cache, and decoding off the event loop."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from vlmserve.multimodal import decode as decode_module
from vlmserve.multimodal.decode import decode_image
from vlmserve.multimodal.hashing import ByteLRU, content_hash
from vlmserve.multimodal.media import MediaConfig, MediaError, MediaLoader

from .conftest import data_url, image_bytes

LIMIT = 50_000_000


def _close(a, b, tol=6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.mark.parametrize("fmt, args, exact", [
    ("PNG", {}, True), ("JPEG", {"quality": 95}, False), ("WEBP", {"lossless": True}, True),
    ("GIF", {}, True), ("BMP", {}, True),
])
def test_each_format_decodes_to_rgb(fmt, args, exact):
    src = Image.new("RGB", (16, 8), (30, 160, 90))
    img = decode_image(image_bytes(src, fmt, **args), LIMIT)
    assert img.mode == "RGB" and img.size == (16, 8)
    pixel = img.getpixel((3, 3))
    assert pixel == (30, 160, 90) if exact and fmt != "GIF" else _close(pixel, (30, 160, 90), 8)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))]
    raw = image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert _close(decode_image(raw, LIMIT).getpixel((2, 2)), (255, 0, 0), 2)


@pytest.mark.parametrize("mode, color, expected", [
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent → white, not red or black
    ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half transparent black over white
    ("LA", (0, 0), (255, 255, 255)),
])
def test_alpha_is_composited_onto_white(mode, color, expected):
    img = decode_image(image_bytes(Image.new(mode, (4, 4), color)), LIMIT)
    assert img.mode == "RGB" and _close(img.getpixel((1, 1)), expected, 1)


def test_palette_transparency_becomes_white():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    raw = image_bytes(pal, "PNG", transparency=1)
    assert decode_image(raw, LIMIT).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    src = Image.new("RGB", (40, 20), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    img = decode_image(image_bytes(src, "PNG", exif=exif.tobytes()), LIMIT)
    assert img.size == (20, 40)
    assert img.getpixel((10, 5)) == (255, 0, 0) and img.getpixel((10, 35)) == (0, 0, 255)


def test_cmyk_jpeg_becomes_rgb():
    raw = image_bytes(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    img = decode_image(raw, LIMIT)
    assert img.mode == "RGB" and _close(img.getpixel((8, 8)), (255, 0, 0), 10)


def test_grayscale_becomes_rgb():
    img = decode_image(image_bytes(Image.new("L", (4, 4), 77)), LIMIT)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)


def test_16_bit_grayscale_is_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = decode_image(image_bytes(Image.fromarray(arr)), LIMIT)
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


# -- the malformed corpus --------------------------------------------------------------------

def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR (with a valid CRC) claims width x height."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_header_claiming_50000x50000_is_refused_before_decoding():
    with pytest.raises(MediaError) as e:
        decode_image(_png_claiming(50000, 50000), LIMIT)
    msg = str(e.value)
    assert e.value.status_code == 400
    assert "50000x50000" in msg and "max_image_pixels=50000000" in msg and "--max-image-pixels" in msg


def test_pixel_limit_is_configurable():
    raw = image_bytes(Image.new("RGB", (100, 100)))
    decode_image(raw, 10_000)
    with pytest.raises(MediaError, match="100x100 = 10000 pixels"):
        decode_image(raw, 9_999)


def _noisy(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    return image_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)


CORPUS = {
    "truncated_png": _noisy("PNG")[: len(_noisy("PNG")) // 2],
    "truncated_jpeg": _noisy("JPEG")[: len(_noisy("JPEG")) // 2],
    "png_signature_only": b"\x89PNG\r\n\x1a\n",
    "random_bytes": os.urandom(4096),
    "gif_header_only": b"GIF89a\x10\x00\x10\x00",
    "bmp_with_bad_header": b"BM" + os.urandom(60),
    "tiff_not_accepted": image_bytes(Image.new("RGB", (4, 4)), "TIFF"),
    "crc_broken_png": _png_claiming(4, 4)[:29] + b"\0\0\0\0" + _png_claiming(4, 4)[33:],
}


@pytest.mark.parametrize("name", sorted(CORPUS))
async def test_malformed_image_is_a_4xx(name):
    with pytest.raises(MediaError) as e:
        await MediaLoader().load_image(data_url(CORPUS[name]))
    assert 400 <= e.value.status_code < 500


async def test_bomb_png_over_data_url_names_the_size_sent():
    with pytest.raises(MediaError, match="50000x50000"):
        await MediaLoader().load_image(data_url(_png_claiming(50000, 50000)))


# -- the decoded cache -----------------------------------------------------------------------

async def test_same_bytes_are_decoded_once():
    loader = MediaLoader()
    url = data_url(image_bytes(Image.new("RGB", (32, 32), (9, 9, 9))))
    first = await loader.load_image(url)
    second = await loader.load_image(url)
    assert (loader.decodes, loader.cache_misses, loader.cache_hits) == (1, 1, 1)
    # Shared, not copied per request (callers treat it as read-only).
    assert second is first and first.getpixel((0, 0)) == (9, 9, 9)


async def test_cache_disabled_decodes_every_time():
    loader = MediaLoader(MediaConfig(cache_bytes=0))
    url = data_url(image_bytes(Image.new("RGB", (8, 8))))
    await loader.load_image(url)
    await loader.load_image(url)
    assert loader.decodes == 2 and loader.cache_hits == 0


def test_lru_is_bounded_in_bytes_and_evicts_least_recent():
    cache = ByteLRU(100)
    cache.put("a", "A", 60)
    cache.put("b", "B", 30)
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("c", "C", 30)  # 120 > 100: b goes
    assert "b" not in cache and "a" in cache and "c" in cache and cache.size_bytes == 90
    cache.put("huge", "H", 101)  # larger than the whole cache: not stored, nothing evicted
    assert "huge" not in cache and len(cache) == 2


def test_content_hash_separates_parts():
    assert content_hash(b"ab", b"c") != content_hash(b"a", b"bc")
    assert content_hash(b"x") == content_hash(b"x") and len(content_hash(b"x")) == 64


# -- off the event loop ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def large_png_url() -> str:
    yy, xx = np.mgrid[0:2000, 0:3000]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    return data_url(image_bytes(Image.fromarray(arr), "PNG", compress_level=1))


async def test_decoding_16_large_images_keeps_the_event_loop_responsive(large_png_url, monkeypatch):
    workers = 2
    active, peak, threads = 0, 0, set()
    lock = threading.Lock()
    real = decode_module.decode_image

    def counting(raw, max_pixels):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
            threads.add(threading.current_thread().name)
        try:
            return real(raw, max_pixels)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(decode_module, "decode_image", counting)
    loader = MediaLoader(MediaConfig(workers=workers, cache_bytes=0))
    done = asyncio.Event()
    lags: list[float] = []

    async def monitor():
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - t0 - 0.005)

    task = asyncio.create_task(monitor())
    images = await asyncio.gather(*(loader.load_image(large_png_url) for _ in range(16)))
    done.set()
    await task
    loader.close()
    assert all(img.size == (3000, 2000) for img in images) and loader.decodes == 16
    assert max(lags) < 0.1, f"event loop stalled for {max(lags) * 1000:.0f} ms"
    assert peak == workers  # the semaphore bounds concurrent decodes, and they ran in parallel
    assert threads and all(name.startswith("media-decode") for name in threads)
