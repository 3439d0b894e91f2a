"""Qwen2-VL's image preprocessing, without torchvision (videos: `video_processor.py`).

Matches transformers' `Qwen2VLImageProcessor` (its PIL backend, `Qwen2VLImageProcessorPil`,
which is what `Qwen2VLImageProcessor` falls back to without torchvision):
  1. `smart_resize`: both sides multiples of patch * merge (28), pixel count in
     [min_pixels, max_pixels], aspect ratio kept as closely as possible;
  2. PIL bicubic resize of the uint8 RGB image;
  3. rescale by 1/255 (in float64, then float32) and normalise per channel (float32);
  4. patchify into rows of [C * temporal_patch * patch * patch], rows ordered merge window by
     merge window: (t, h // merge, w // merge, merge_h, merge_w). One image is repeated to
     fill the temporal patch.

Steps 1-2 run in the front end (`Qwen2VLProcessor`); steps 3-4 run where the vision tower
runs (`Qwen2VLForConditionalGeneration.embed_multimodal`, through `kernels.normalize_patchify`):
the request carries the resized uint8 pixels, a quarter of float32's bytes. Steps 3-4 are a
lookup in one float32 [3, 256] table (`lut`, computed with transformers' exact float
arithmetic, so results are bit-identical) and one permutation: no per-patch loops.
`preprocess_image` runs all four steps on the CPU (transformers parity, benchmarks).
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

from vlmserve.kernels import reference

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """The (height, width) Qwen2-VL resizes an image to: multiples of `factor`, with
    min_pixels <= height * width <= max_pixels, aspect ratio as close as possible."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image must have a positive size, got {width}x{height}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image aspect ratio must be at most {MAX_ASPECT_RATIO}:1, got {width}x{height} "
            f"({ratio:.1f}:1); crop or pad the image first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Qwen2VLImageProcessor:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    # float32 [3, 256], entry [c, v]: uint8 level v of channel c after steps 3 (the numpy array
    # shares the tensor's memory; items carry the array: cheaper to pickle than a tensor).
    lut: torch.Tensor = field(init=False, repr=False, compare=False)
    lut_array: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(float(m) for m in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(s) for s in self.image_std))
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {self.image_mean}, {self.image_std}")
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels}); "
                "lower --min-pixels or raise --max-pixels"
            )
        # Same arithmetic as transformers: uint8 -> float64 * scale -> float32, then
        # (x - mean) / std in float32. Exact, so the table reproduces it bit for bit.
        lut = reference.normalize_lut(self.image_mean, self.image_std, self.rescale_factor)
        object.__setattr__(self, "lut", lut)
        object.__setattr__(self, "lut_array", lut.numpy())

    @classmethod
    def from_preprocessor_config(
        cls, config: dict[str, Any], overrides: dict[str, Any] | None = None
    ) -> "Qwen2VLImageProcessor":
        """From a `preprocessor_config.json` dict: the published layout (top-level `min_pixels` /
        `max_pixels`) or the newer one (`size: {shortest_edge, longest_edge}`, in pixels).
        `overrides` (None values ignored) win over both."""
        kwargs: dict[str, Any] = {}
        size = config.get("size") or {}
        if "shortest_edge" in size:
            kwargs["min_pixels"] = size["shortest_edge"]
        if "longest_edge" in size:
            kwargs["max_pixels"] = size["longest_edge"]
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
                    "image_mean", "image_std", "rescale_factor", "resample"):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        if config.get("do_rescale") is False or config.get("do_normalize") is False or config.get("do_resize") is False:
            raise ValueError("preprocessor_config.json turns off resize/rescale/normalize; Qwen2-VL needs all three")
        kwargs.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**kwargs)

    @property
    def factor(self) -> int:
        """Side multiple of a resized image: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def settings_key(self) -> str:
        """Every setting that shapes the output, as a stable string (for content hashes)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return json.dumps(settings, sort_keys=True)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_tokens(self, height: int, width: int) -> int:
        """Placeholder tokens one image of this size takes in the prompt."""
        h, w = self.resized_size(height, width)
        return (h // self.factor) * (w // self.factor)

    def resize(self, image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
        """uint8 [H', W', 3] after smart_resize (or to `size` = (h, w))."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}; convert it with image.convert('RGB')")
        h, w = size if size is not None else self.resized_size(image.height, image.width)
        return np.asarray(image.resize((w, h), resample=self.resample))

    @property
    def patchify(self) -> tuple[int, int, int]:
        """(patch_size, merge_size, temporal_patch_size): the patch layout of the encoder input."""
        return self.patch_size, self.merge_size, self.temporal_patch_size

    def grid(self, pixels: np.ndarray) -> tuple[int, int, int]:
        """(grid_t, grid_h, grid_w) of resized pixels [H, W, 3] (one temporal patch)."""
        return 1, pixels.shape[-3] // self.patch_size, pixels.shape[-2] // self.patch_size

    def normalize_patchify(self, pixels: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Resized uint8 pixels [H, W, 3] (H and W multiples of `factor`) -> (float32
        [grid_h * grid_w, 3 * tp * p * p], (1, grid_h, grid_w)), on the CPU."""
        values = reference.normalize_patchify(uint8_tensor(pixels), self.lut, *self.patchify)
        return values, self.grid(pixels)

    def preprocess_image(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """RGB image -> (pixel_values float32 [grid_h * grid_w, 3 * tp * p * p], (1, grid_h, grid_w))."""
        return self.normalize_patchify(self.resize(image))

    def content_hash(self, pixels: np.ndarray, grid_thw: tuple[int, int, int], modality: str = "image") -> str:
        """sha256 (hex) of the resized uint8 pixels, their shape, the grid and every setting."""
        return pixels_hash(modality, pixels, grid_thw, self.settings_key())


def uint8_tensor(array: np.ndarray) -> torch.Tensor:
    """A uint8 array as a CPU tensor, sharing its memory when it is writable. Arrays from PIL
    (`np.asarray(image)`) and from unpickling are read-only, which torch.from_numpy warns
    about: those are copied (a resized image is a few hundred KB)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def pixels_hash(modality: str, pixels: np.ndarray, grid_thw: tuple[int, int, int], settings: str) -> str:
    """sha256 (hex) of the modality, the pixels' shape, the grid, the processor settings and the
    uint8 pixels: equal hashes mean equal encoder inputs."""
    h = hashlib.sha256()
    h.update(modality.encode())
    h.update(repr((pixels.shape, tuple(grid_thw))).encode())
    h.update(settings.encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()
