"""Mllama's image preprocessing, equal to transformers' `MllamaImageProcessor` (its PIL
backend, `MllamaImageProcessorPil`, which is what it resolves to without torchvision):

  1. RGB (transparency composited onto white);
  2. canvas: among the tile arrangements (rows, cols) with rows * cols <= max_image_tiles, the
     one whose fit scale is the smallest >= 1 (upscaling), else the largest < 1; ties → the
     smallest area;
  3. resize (PIL bilinear on uint8) to fit the canvas keeping the aspect ratio, each side at
     least one tile (clamped to the canvas);
  4. pad bottom/right with 0 to the canvas, rescale by 1/255 (float64 → float32), normalise;
  5. split into tiles, row-major: [rows * cols, 3, tile, tile];
  aspect_ratio_id = 1 + index of (rows, cols) in the arrangement list (0 is "no image").

Steps 4's arithmetic is one float32 table per channel (bit-identical to transformers').
The padding is level 0 *before* normalising (transformers pads, then rescales and
normalises), so it normalises to (0 - mean) / std, not 0; tiles past an image's count are
zeros after normalising (transformers' packing).

What crosses to the engine: the padded uint8 canvas and the table (`lut`), a quarter of the
float32 tiles' bytes; the model normalises and tiles it on its device
(`kernels.normalize_patchify`). `TiledImage.pixel_values` computes the float32 tiles on the
CPU (tests, transformers).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def supported_arrangements(max_tiles: int) -> list[tuple[int, int]]:
    """(rows, cols) with rows * cols <= max_tiles, in transformers' order (rows outer)."""
    return [(a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles]


def optimal_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(canvas height, canvas width) in pixels, multiples of `tile` (see the module docstring)."""
    canvases = [(a * tile, b * tile) for a, b in supported_arrangements(max_tiles)]
    scales = [min(ch / height, cw / width) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    best = min(up) if up else max(s for s in scales if s < 1)
    chosen = [c for c, s in zip(canvases, scales) if s == best]
    return min(chosen, key=lambda c: c[0] * c[1])  # first of the smallest area, as np.argmin


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """The resized (height, width): aspect ratio kept, each side clamped to [tile, canvas]."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: alpha (or a transparency key) composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def normalized_tiles(canvas: np.ndarray, lut: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """uint8 canvas [rows * t, cols * t, 3] → float32 [rows * cols, 3, t, t] through the table:
    tiles row-major (the reference of what the model computes on its device)."""
    t = canvas.shape[0] // rows
    x = np.empty((3, *canvas.shape[:2]), dtype=np.float32)
    for ch in range(3):
        np.take(lut[ch], canvas[..., ch], out=x[ch])
    # [3, rows, t, cols, t] → [rows, cols, 3, t, t]: tiles row-major.
    tiles = x.reshape(3, rows, t, cols, t).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
    return torch.from_numpy(np.ascontiguousarray(tiles))


@dataclass(frozen=True)
class TiledImage:
    aspect_ratio: tuple[int, int]  # (rows, cols) of tiles
    aspect_ratio_id: int  # 1-based
    canvas: np.ndarray  # uint8 [rows * tile, cols * tile, 3]: resized and padded, before normalising
    lut: np.ndarray  # float32 [3, 256]: level v of channel c normalises to lut[c, v]

    @property
    def num_tiles(self) -> int:
        return self.aspect_ratio[0] * self.aspect_ratio[1]

    @property
    def pixel_values(self) -> torch.Tensor:
        """float32 [num_tiles, 3, tile, tile], normalised (computed on each access)."""
        return normalized_tiles(self.canvas, self.lut, *self.aspect_ratio)


@dataclass(frozen=True)
class MllamaImageProcessor:
    tile_size: int = 560
    max_image_tiles: int = 4
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BILINEAR)
    _lut: np.ndarray = field(init=False, repr=False, compare=False)  # float32 [3, 256]

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(float(m) for m in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(s) for s in self.image_std))
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {self.image_mean}, {self.image_std}")
        if self.tile_size < 1 or self.max_image_tiles < 1:
            raise ValueError(f"tile size {self.tile_size} and max_image_tiles {self.max_image_tiles} must be >= 1")
        levels = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        object.__setattr__(self, "_lut", np.ascontiguousarray((levels[None, :] - mean) / std))

    @classmethod
    def from_preprocessor_config(cls, config: dict[str, Any]) -> MllamaImageProcessor:
        """From preprocessor_config.json (`size: {height, width}` square, `max_image_tiles`, ...);
        absent keys get transformers' class defaults, except the tile, which is 224 there and
        must be given by real checkpoints (560)."""
        if config.get("do_resize") is False or config.get("do_pad") is False:
            raise ValueError("preprocessor_config.json turns off resize or pad; Mllama needs both")
        if config.get("do_rescale") is False or config.get("do_normalize") is False:
            raise ValueError("preprocessor_config.json turns off rescale or normalize; not supported for Mllama")
        size = config.get("size") or {"height": 224, "width": 224}
        if size.get("height") != size.get("width"):
            raise ValueError(f"Mllama tiles are square; preprocessor_config.json size is {size}")
        kwargs: dict[str, Any] = {"tile_size": int(size["height"])}
        for key in ("max_image_tiles", "image_mean", "image_std", "rescale_factor", "resample"):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        for key in ("image_mean", "image_std"):  # transformers' class defaults: IMAGENET_STANDARD, 0.5
            kwargs.setdefault(key, (0.5, 0.5, 0.5))
        return cls(**kwargs)

    def settings_key(self) -> str:
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.init}, sort_keys=True)

    def preprocess(self, image: Image.Image) -> TiledImage:
        image = to_rgb(image)
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image must have a positive size, got {image.width}x{image.height}")
        t = self.tile_size
        canvas_h, canvas_w = optimal_canvas(image.height, image.width, self.max_image_tiles, t)
        new_h, new_w = fit_to_canvas(image.height, image.width, canvas_h, canvas_w, t)
        resized = np.asarray(image.resize((new_w, new_h), resample=self.resample))
        canvas = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)
        canvas[:new_h, :new_w] = resized
        ratio = (canvas_h // t, canvas_w // t)
        return TiledImage(
            aspect_ratio=ratio,
            aspect_ratio_id=supported_arrangements(self.max_image_tiles).index(ratio) + 1,
            canvas=canvas,
            lut=self._lut,
        )

    def content_hash(self, tiled: TiledImage) -> str:
        """sha256 of the padded uint8 canvas, its tiling and every setting."""
        h = hashlib.sha256(b"mllama-image")
        h.update(repr((tiled.canvas.shape, tiled.aspect_ratio)).encode())
        h.update(self.settings_key().encode())
        h.update(np.ascontiguousarray(tiled.canvas).tobytes())
        return h.hexdigest()
