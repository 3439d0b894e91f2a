"""Pixtral's image preprocessing, in the two flavours its two checkpoint formats use.

Both fit the image within `longest_edge` (the model's max image size) and then cover it with a
whole number of patches: a (rows x cols) grid, the image resized to (rows * P, cols * P).
They differ in the details, so each format matches its own reference exactly:

- "hf" (transformers' `PixtralImageProcessorPil`, the PIL backend `PixtralImageProcessor`
  falls back to without torchvision): ratio = max(h, w) / longest_edge; if > 1, each side
  becomes floor(side / ratio); then ceil to patches. PIL bicubic resize of the uint8 image,
  then x * (1/255) (float64 → float32) and (x - mean) / std in float32 (a per-channel table).
- "mistral" (mistral-common's `ImageEncoder`, which `encode_chat_completion` uses): the same
  but sides become max(round(side / ratio), 1) (Python's round), and the resize is OpenCV's
  `INTER_CUBIC` on float32 pixels (Keys cubic a = -0.75, no antialiasing, edge pixels
  repeated), reproduced here with numpy as two separable matmuls; then x / 255, - mean, / std.

Images with transparency are composited over white first (both references do).

What crosses to the engine ("hf"): the resized uint8 pixels [rows * P, cols * P, 3] and the
float32 [3, 256] table of the normalisation (`lut`); the model normalises and patchifies them
on its device (`kernels.normalize_patchify`, layout "patches"): bit-identical to
transformers' float32 output, a quarter of its bytes. `preprocess` gives the float32
[3, rows * P, cols * P] on the CPU (the reference's output, for tests and transformers).
"mistral": OpenCV's cubic resize runs on float pixels and is not clipped, so its output is
not uint8 and rounding it would move the model's inputs off mistral-common's. What crosses
is whichever of the two exact inputs has fewer bytes (`mistral_input`): the uint8 source
image [H, W, 3], resized and normalised beside the tower (`mistral_resize_normalize`, two
float32 matmuls; images up to twice the longest edge a side), or, for larger sources, the
float32 [3, rows * P, cols * P] result itself (at most longest_edge² * 12 bytes).
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

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("hf", "mistral")
_CV2_CUBIC_A = -0.75


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def cubic_resize_matrix(src: int, dst: int) -> np.ndarray:
    """float64 [dst, src]: OpenCV's INTER_CUBIC along one axis (half-pixel centres, Keys
    a = -0.75, 4 taps clamped to the edge)."""
    m = np.zeros((dst, src), dtype=np.float64)
    # OpenCV computes the source coordinate in float32.
    fx = ((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5).astype(np.float32).astype(np.float64)
    sx = np.floor(fx)
    t = fx - sx
    a = _CV2_CUBIC_A
    w0 = ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a
    w1 = ((a + 2) * t - (a + 3)) * t * t + 1
    w2 = ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1
    w3 = 1 - w0 - w1 - w2
    rows = np.arange(dst)
    for k, w in enumerate((w0, w1, w2, w3)):
        np.add.at(m, (rows, np.clip(sx.astype(np.int64) + k - 1, 0, src - 1)), w)
    return m


def mistral_resize_normalize(src: torch.Tensor, height: int, width: int, mean: tuple[float, ...],
                             std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [H, W, 3] (any device) → float32 [3, height, width]: OpenCV's INTER_CUBIC on float
    pixels (rows first, then columns, unclipped), then x / 255, - mean, / std in float32, as
    mistral-common's `transform_image`. Runs where `src` lives."""
    H, W = src.shape[:2]
    dev = src.device
    ys = torch.from_numpy(cubic_resize_matrix(H, height).astype(np.float32)).to(dev)  # [h, H]
    xs = torch.from_numpy(cubic_resize_matrix(W, width).astype(np.float32)).to(dev)  # [w, W]
    rows_done = ys @ src.to(torch.float32).reshape(H, W * 3)  # [h, W * 3]
    resized = rows_done.reshape(height, W, 3).permute(2, 0, 1) @ xs.T  # [3, h, w]
    m = torch.tensor(mean, dtype=torch.float32, device=dev).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=dev).view(3, 1, 1)
    return (resized / 255.0 - m) / s


@dataclass(frozen=True)
class PixtralImageProcessor:
    mode: str = "hf"
    patch_size: int = 16
    longest_edge: int = 1024
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)  # "hf" mode only
    _lut: np.ndarray = field(init=False, repr=False, compare=False)  # float32 [3, 256]

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(float(m) for m in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(s) for s in self.image_std))
        if self.mode not in MODES:
            raise ValueError(f"image processor mode must be one of {MODES}, got {self.mode!r}")
        if self.patch_size < 1 or self.longest_edge < self.patch_size:
            raise ValueError(f"need 1 <= patch_size <= longest_edge, got {self.patch_size}, {self.longest_edge}")
        # transformers' arithmetic: uint8 → float64 * scale → float32, then (x - mean) / std in
        # float32. Exact per level, so a table reproduces it bit for bit.
        levels = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        object.__setattr__(self, "_lut", np.ascontiguousarray((levels[None, :] - mean) / std))

    @classmethod
    def from_preprocessor_config(
        cls, config: dict[str, Any], overrides: dict[str, Any] | None = None
    ) -> PixtralImageProcessor:
        """From the HF `preprocessor_config.json` (`size: {longest_edge}`, `patch_size:
        {height, width}`); `overrides` (None values ignored) win."""
        kwargs: dict[str, Any] = {"mode": "hf"}
        size = config.get("size") or {}
        if size.get("longest_edge") is not None:
            kwargs["longest_edge"] = int(size["longest_edge"])
        elif size.get("height") is not None:
            if size.get("height") != size.get("width"):
                raise ValueError(f"preprocessor_config.json size {size} must be square or a longest_edge")
            kwargs["longest_edge"] = int(size["height"])
        patch = config.get("patch_size")
        if isinstance(patch, dict):
            if patch.get("height") != patch.get("width"):
                raise ValueError(f"preprocessor_config.json patch_size {patch} must be square")
            patch = patch.get("height")
        if patch is not None:
            kwargs["patch_size"] = int(patch)
        for key in ("image_mean", "image_std", "rescale_factor", "resample"):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        if any(config.get(k) is False for k in ("do_resize", "do_rescale", "do_normalize")):
            raise ValueError("preprocessor_config.json turns off resize/rescale/normalize; Pixtral needs all three")
        kwargs.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**kwargs)

    def settings_key(self) -> str:
        """Every setting that shapes the output, as a stable string (for content hashes)."""
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.init}, sort_keys=True)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of patches an image of this size is resized to."""
        if height <= 0 or width <= 0:
            raise ValueError(f"image must have a positive size, got {width}x{height}")
        ratio = max(height, width) / self.longest_edge
        if ratio > 1:
            if self.mode == "hf":
                height, width = math.floor(height / ratio), math.floor(width / ratio)
            else:
                height, width = max(round(height / ratio), 1), max(round(width / ratio), 1)
        if height < 1 or width < 1:
            raise ValueError(
                f"image aspect ratio is too extreme: it leaves a side of 0 pixels after fitting into "
                f"{self.longest_edge}x{self.longest_edge}; crop or pad the image first"
            )
        p = self.patch_size
        return (height - 1) // p + 1, (width - 1) // p + 1

    def num_tokens(self, height: int, width: int) -> int:
        """Prompt tokens one image takes: rows * (cols + 1) ([IMG] per patch, one break/end per row)."""
        rows, cols = self.patch_grid(height, width)
        return rows * (cols + 1)

    @property
    def lut(self) -> np.ndarray:
        """float32 [3, 256], read-only: pixel level v of channel c normalises to lut[c, v]."""
        return self._lut

    def resize(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """"hf" mode: any PIL image → (uint8 [rows * P, cols * P, 3] resized, (rows, cols))."""
        if self.mode != "hf":
            raise ValueError("resize() is the hf mode's; the mistral mode resizes in float (preprocess)")
        image = to_rgb(image)
        rows, cols = self.patch_grid(image.height, image.width)
        h, w = rows * self.patch_size, cols * self.patch_size
        return np.asarray(image.resize((w, h), resample=self.resample)), (rows, cols)

    def normalize(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [h, w, 3] → float32 [3, h, w] through the table (what the model computes)."""
        x = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for ch in range(3):
            np.take(self._lut[ch], pixels[..., ch], out=x[ch])
        return torch.from_numpy(x)

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Any PIL image → (pixel_values float32 [3, rows * P, cols * P], (rows, cols))."""
        if self.mode == "hf":
            pixels, grid = self.resize(image)
            return self.normalize(pixels), grid
        image = to_rgb(image)
        rows, cols = self.patch_grid(image.height, image.width)
        src = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H, W, 3], a writable copy
        p = self.patch_size
        return mistral_resize_normalize(src, rows * p, cols * p, self.image_mean, self.image_std), (rows, cols)

    def mistral_input(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """"mistral" mode: what crosses to the engine, the fewer bytes of two exact forms: the
        uint8 source [H, W, 3] (the model resizes it, `mistral_resize_normalize`) or the
        float32 [3, rows * P, cols * P] result; and (rows, cols)."""
        image = to_rgb(image)
        rows, cols = self.patch_grid(image.height, image.width)
        if image.width * image.height * 3 <= rows * cols * self.patch_size**2 * 3 * 4:
            return np.asarray(image), (rows, cols)
        pixel_values, grid = self.preprocess(image)
        return pixel_values.numpy(), grid

    def content_hash(self, pixel_values: torch.Tensor | np.ndarray) -> str:
        """sha256 (hex) of what the encoder is given (uint8 [h, w, 3] resized pixels, or the
        preprocessed float32 [3, h, w]) and every setting: equal hashes mean equal encoder inputs."""
        x = np.ascontiguousarray(np.asarray(pixel_values))
        if x.dtype != np.uint8:
            x = x.astype(np.float32, copy=False)
        h = hashlib.sha256(b"pixtral-image")
        h.update(repr((x.dtype.str, x.shape)).encode())
        h.update(self.settings_key().encode())
        h.update(x.tobytes())
        return h.hexdigest()
