"""Qwen2-VL's video preprocessing, without torchvision.

Matches transformers' `Qwen2VLVideoProcessor`, whose only backend is torchvision (run on the
CPU, as transformers does by default). For one clip of uint8 frames [N, H, W, 3]:
  1. one target size for every frame: `smart_resize` of (H, W) with the *video* processor's
     limits. Class defaults are min 128*28*28 and max 768*28*28 pixels, but transformers reads
     the settings from processor_config.json's "video_processor", else
     video_preprocessor_config.json, else preprocessor_config.json: Qwen2-VL's published
     checkpoints ship only the last, so their videos get the image limits. With
     `cap_pixels_per_frame`, max_pixels is also bounded by an even share of a whole-clip budget;
  2. antialiased bicubic resize by torch's native uint8 kernel, which is what torchvision's
     `resize` runs for a uint8 CPU tensor. It is not PIL's resize (the image path): the two
     differ by 1-2 levels on under 1% of pixels, in transformers as here;
  3. rescale and normalise fused as torchvision does, (x - 255 * mean) / (255 * std) in
     float32, via a 256-entry table per channel (`lut`, bit-identical);
  4. the last frame repeated up to a multiple of temporal_patch_size, then the image path's
     patch layout: rows [grid_t * grid_h * grid_w, 3 * tp * p * p] ordered
     (t, h // merge, w // merge, merge_h, merge_w).
Steps 1, 2 and the padding of 4 run in the front end; the table lookup and the patch layout
run with the vision tower (`kernels.normalize_patchify`), as for images.
Frame sampling (fps, frame caps) happens before this, in `vlmserve.multimodal.video`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlmserve.kernels import reference
from vlmserve.models.qwen2_vl.image_processor import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    pixels_hash,
    smart_resize,
    uint8_tensor,
)

# transformers' class defaults for Qwen2-VL video (Qwen2VLVideoProcessor.size).
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
# Share of `max_video_tokens` the capped per-frame budget spends (transformers' constant).
_CAP_BUDGET_SHARE = 0.9
_CAP_MIN_PIXELS_MARGIN = 1.05


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_video_preprocessor_config(model_dir: str | Path) -> dict[str, Any]:
    """The video processor settings of a checkpoint, found where transformers looks, in its
    order: processor_config.json's "video_processor", video_preprocessor_config.json,
    preprocessor_config.json; {} (class defaults) when none exists."""
    model_dir = Path(model_dir)
    nested = _read_json(model_dir / "processor_config.json") or {}
    if "video_processor" in nested:
        return dict(nested["video_processor"])
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        config = _read_json(model_dir / name)
        if config is not None:
            return config
    return {}


@dataclass(frozen=True)
class Qwen2VLVideoProcessor:
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)
    cap_pixels_per_frame: bool = False  # transformers 5.24's default (None -> False, with a warning)
    max_video_tokens: int = 128000
    # float32 [3, 256], entry [c, v]: uint8 level v of channel c after step 3; the array shares
    # the tensor's memory.
    lut: torch.Tensor = field(init=False, repr=False, compare=False)
    lut_array: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(float(m) for m in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(s) for s in self.image_std))
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {self.image_mean}, {self.image_std}")
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "max_video_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"video processor {name} must be at least 1, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"video min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if self.resample != int(Image.Resampling.BICUBIC):
            raise ValueError(
                f"video resample={self.resample} is not supported: Qwen2-VL resizes videos with bicubic (3)"
            )
        # torchvision folds the rescale into mean and std (both float32, times 1 / rescale_factor
        # in float32) and computes (x - mean) / std in float32, x the uint8 level as float32.
        scale = np.float32(1.0 / self.rescale_factor)
        mean = (np.asarray(self.image_mean, dtype=np.float32) * scale)[:, None]
        std = (np.asarray(self.image_std, dtype=np.float32) * scale)[:, None]
        levels = np.arange(256, dtype=np.float32)[None, :]
        lut = np.ascontiguousarray((levels - mean) / std)
        object.__setattr__(self, "lut_array", lut)
        object.__setattr__(self, "lut", torch.from_numpy(lut))

    @classmethod
    def from_config(cls, config: dict[str, Any], overrides: dict[str, Any] | None = None) -> "Qwen2VLVideoProcessor":
        """From a video (or image) preprocessor config dict: `size: {shortest_edge, longest_edge}`
        in pixels, then top-level `min_pixels` / `max_pixels` over it (transformers' precedence),
        then `overrides` (None values ignored)."""
        kwargs: dict[str, Any] = {}
        size = config.get("size") or {}
        if size.get("shortest_edge") is not None:
            kwargs["min_pixels"] = size["shortest_edge"]
        if size.get("longest_edge") is not None:
            kwargs["max_pixels"] = size["longest_edge"]
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
                    "image_std", "rescale_factor", "resample", "cap_pixels_per_frame", "max_video_tokens"):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        if config.get("do_rescale") is False or config.get("do_normalize") is False or config.get("do_resize") is False:
            raise ValueError("the video processor config turns off resize/rescale/normalize; Qwen2-VL needs all three")
        kwargs.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**kwargs)

    @property
    def factor(self) -> int:
        """Side multiple of a resized frame: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def settings_key(self) -> str:
        """Every setting that shapes the output, as a stable string (for content hashes)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return json.dumps(settings, sort_keys=True)

    def resized_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) every frame of a clip of `num_frames` (before temporal padding) is
        resized to."""
        max_pixels = self.max_pixels
        if self.cap_pixels_per_frame:
            # Each frame gets an even share of a budget of max_video_tokens merged tokens (per
            # temporal patch), never below just over min_pixels.
            total = int(self.max_video_tokens * self.factor * self.factor * _CAP_BUDGET_SHARE)
            max_pixels = max(
                min(max_pixels, total * self.temporal_patch_size // num_frames),
                int(self.min_pixels * _CAP_MIN_PIXELS_MARGIN),
            )
        return smart_resize(height, width, self.factor, self.min_pixels, max_pixels)

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Placeholder tokens one clip of this shape takes in the prompt."""
        h, w = self.resized_size(num_frames, height, width)
        grid_t = -(-num_frames // self.temporal_patch_size)
        return grid_t * (h // self.factor) * (w // self.factor)

    def resize(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> uint8 [N, H', W', 3], all frames to one `resized_size`."""
        _check_frames(frames)
        n, h, w, _ = frames.shape
        new_h, new_w = self.resized_size(n, h, w)
        if (new_h, new_w) == (h, w):
            return frames
        # [N, 3, H, W] viewed over the NHWC buffer (channels-last strides): torch's uint8
        # antialiased kernel reads that layout directly; the values do not depend on it.
        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        out = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        return out.permute(0, 2, 3, 1).contiguous().numpy()

    def pad_frames(self, frames: np.ndarray) -> np.ndarray:
        """[N, H, W, 3] -> [ceil(N / tp) * tp, H, W, 3], the last frame repeated."""
        pad = -frames.shape[0] % self.temporal_patch_size
        if not pad:
            return frames
        return np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])

    @property
    def patchify(self) -> tuple[int, int, int]:
        """(patch_size, merge_size, temporal_patch_size): the patch layout of the encoder input."""
        return self.patch_size, self.merge_size, self.temporal_patch_size

    def grid(self, padded: np.ndarray) -> tuple[int, int, int]:
        """(grid_t, grid_h, grid_w) of resized, padded frames [T, H, W, 3]."""
        t, h, w, _ = padded.shape
        return t // self.temporal_patch_size, h // self.patch_size, w // self.patch_size

    def normalize_patchify(self, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Resized uint8 frames [N, H', W', 3] -> (float32 [grid_t * grid_h * grid_w, 3 * tp * p * p],
        (grid_t, grid_h, grid_w)), N padded to a multiple of tp first; on the CPU."""
        padded = self.pad_frames(frames)
        return reference.normalize_patchify(uint8_tensor(padded), self.lut, *self.patchify), self.grid(padded)

    def preprocess(self, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """uint8 frames [N, H, W, 3] of one clip -> (pixel_values, (grid_t, grid_h, grid_w)), the
        layout of transformers' `pixel_values_videos` / `video_grid_thw` for that clip."""
        return self.normalize_patchify(self.resize(frames))

    def content_hash(self, resized: np.ndarray, grid_thw: tuple[int, int, int]) -> str:
        """sha256 (hex) of the resized uint8 frames, their shape, the grid and every setting."""
        return pixels_hash("video", resized, grid_thw, self.settings_key())


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", None)
        raise ValueError(f"video frames must be a uint8 array [N, H, W, 3] (RGB), got {type(frames).__name__} "
                         f"{getattr(frames, 'dtype', '')} {shape}")
    if frames.shape[0] == 0:
        raise ValueError("a video needs at least one frame, got 0")
