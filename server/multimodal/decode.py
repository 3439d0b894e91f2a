"""Image bytes → PIL image in RGB. Runs in a worker thread (never on the event loop).

Accepted: PNG, JPEG, WEBP, GIF and BMP, sniffed from their magic bytes; only those five
Pillow parsers are ever reached (Pillow's dozens of rarer parsers are attack surface we do not
need). Animated files give their first frame.

Order of work, so a hostile file costs little:
  1. the format's header parser reads the size (no pixel data yet);
  2. width x height is checked against `max_pixels` (a 50000x50000 PNG is refused here,
     having cost a few hundred bytes, with our own message naming the limit and the size);
  3. only then pixels are decoded; truncated data is an error, not a grey bottom half;
  4. EXIF orientation is applied; alpha is composited onto white; every other mode
     (grayscale, palette, CMYK, 16-bit) becomes 8-bit RGB.

The header parser classes are built directly rather than through `Image.open` so that our
size check runs before Pillow's process-global `MAX_IMAGE_PIXELS` check, which would refuse
the same file with a message that names neither our limit nor our flag. Pillow's own
DecompressionBombError (GIF frames larger than the canvas can trip it) still maps to a 400.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from vlmserve.multimodal.types import MediaError

FORMATS = "PNG, JPEG, WEBP, GIF or BMP"
# What Pillow raises for bad data: truncation is OSError("image file is truncated"), broken
# streams OSError/SyntaxError, bad palettes ValueError, short headers struct.error/IndexError.
_PILLOW_DATA_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError,
                       TypeError, struct.error, MemoryError, UnidentifiedImageError)
_WHITE = (255, 255, 255)


def _sniff(raw: bytes) -> type[Image.Image] | None:
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return PngImagePlugin.PngImageFile
    if raw.startswith(b"\xff\xd8\xff"):
        return JpegImagePlugin.JpegImageFile
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return WebPImagePlugin.WebPImageFile
    if raw[:6] in (b"GIF87a", b"GIF89a"):
        return GifImagePlugin.GifImageFile
    if raw.startswith(b"BM"):
        return BmpImagePlugin.BmpImageFile
    return None


def check_pixels(width: int, height: int, max_pixels: int, what: str = "image") -> None:
    if width * height > max_pixels:
        raise MediaError(f"{what} of {width}x{height} = {width * height} pixels exceeds the limit "
                         f"max_image_pixels={max_pixels}; the server's --max-image-pixels raises "
                         "it, or send a smaller image")


def decode_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Decodes `raw` to a loaded RGB image. Raises MediaError (400) for anything bad."""
    parser = _sniff(raw)
    if parser is None:
        raise MediaError(f"the image data is not a {FORMATS} image (unrecognised header)")
    try:
        img = parser(io.BytesIO(raw))  # header only: no pixel data is decoded yet
        check_pixels(*img.size, max_pixels)
        img.load()  # LOAD_TRUNCATED_IMAGES stays False: a truncated file raises here
        return to_rgb(_upright(img))
    except MediaError:
        raise
    except Image.DecompressionBombError as e:
        raise MediaError(f"image refused as a decompression bomb ({e}); the limit is "
                         f"max_image_pixels={max_pixels} (--max-image-pixels)") from None
    except _PILLOW_DATA_ERRORS as e:
        raise MediaError(f"cannot decode the image (truncated or corrupt): {e}") from None


def _upright(img: Image.Image) -> Image.Image:
    """Applies the EXIF orientation tag to `img` (a decoded image of our own) and returns it.
    A malformed EXIF block keeps the image as stored rather than failing the request: the
    pixels are fine."""
    try:
        # In place: without an orientation tag (nearly every image) the default form returns
        # a full copy of the pixels.
        ImageOps.exif_transpose(img, in_place=True)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError):
        pass
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode → 8-bit RGB; transparency composited onto white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale PNG. Pillow's own I→L conversion clips at 255 (a bright image
        # turns white), so scale the full 0..65535 range onto 0..255 instead.
        arr = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def image_nbytes(img: Image.Image) -> int:
    """Memory held by a decoded RGB image (for the byte-bounded cache)."""
    return img.width * img.height * len(img.getbands())
