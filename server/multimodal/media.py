"""Media references → decoded media (placeholder: replaced by the media pipeline).

Interface used by the API layer:
    loader = MediaLoader(MediaConfig(...))
    image = await loader.load_image(url)     # PIL.Image in RGB; raises MediaError
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, ImageOps


class MediaError(ValueError):
    """Bad media from the client. `status_code` is the HTTP status to answer with."""

    def __init__(self, message: str, status_code: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param


@dataclass(frozen=True)
class MediaConfig:
    max_image_pixels: int = 64 * 1024 * 1024
    max_media_bytes: int = 32 * 1024 * 1024


class MediaLoader:
    def __init__(self, config: MediaConfig | None = None) -> None:
        self.config = config or MediaConfig()

    async def load_image(self, url: str) -> Image.Image:
        if not url.startswith("data:"):
            raise MediaError("only data: URLs are supported for image_url", param="image_url")
        return await asyncio.to_thread(self._decode_data_url, url)

    def _decode_data_url(self, url: str) -> Image.Image:
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise MediaError("image data: URLs must be base64 encoded (data:image/png;base64,...)")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("image data: URL has invalid base64") from None
        try:
            img = Image.open(io.BytesIO(raw))
            w, h = img.size
            if w * h > self.config.max_image_pixels:
                raise MediaError(
                    f"image of {w}x{h} = {w * h} pixels exceeds the limit of {self.config.max_image_pixels} pixels"
                )
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(bg, img)
            return img.convert("RGB")
        except MediaError:
            raise
        except Exception as e:  # Pillow raises many types for bad data
            raise MediaError(f"cannot decode image: {e}") from None
