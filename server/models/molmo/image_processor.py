"""Molmo v1's image preprocessing (the official `MolmoImageProcessor`), without TensorFlow.

Per image, the official code builds
  - the global crop: the image resized to fit base_image_input_size (336²), centred on a
    zero canvas;
  - the high-res crops: `select_tiling` picks (rows, cols) <= max_crops tiles of the crop window
    (336 - 2 * 4 patches margin = 224 px); the image is resized to fit
    (rows * 224 + 112, cols * 224 + 112), centred on a zero canvas, and cut into rows x cols
    overlapping 336² crops at strides of 224 px;
both resized by TensorFlow's antialiased bilinear (`tf.image.resize(..., BILINEAR,
antialias=True)` = `ScaleAndTranslate` with a triangle kernel widened by the downscale factor)
on [0, 1] floats, clipped, zero-padded, then CLIP-normalised; crops flattened to
[576, 14 * 14 * 3] rows in (patch row, patch col, channel) order.

Here the host does the arithmetic only: the tiling, the resize spans (start and weights of each
output row/column, computed with TensorFlow's float32 formulas), the crop origins, the padding
masks and the token layout. The pixels stay uint8 and the engine's device does the resize,
normalisation and patchify in one op (`kernels.resize_patchify`), beside the vision tower.

The images settings are the official processor's `_defaults` (which win over
preprocessor_config.json in the official `MolmoProcessor.process`), optionally overridden by
keys of tokenizer_config.json, exactly as `ProcessorMixin._merge_kwargs` does.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from vlmserve.kernels import reference

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# tf.image.convert_image_dtype(uint8 -> float32): float32(v) * float32(1 / 255).
LEVELS = (np.arange(256, dtype=np.float32) * np.float32(1.0 / 255)).astype(np.float32)
IMAGES_KWARGS = ("max_crops", "overlap_margins", "base_image_input_size", "image_token_length_w",
                 "image_token_length_h", "image_patch_size", "image_padding_mask")


def select_tiling(h: int, w: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """(rows, cols) of crop windows for an image of h x w pixels (margins removed; may be <= 0),
    as the official `select_tiling`: the tiling needing the least upscaling, or, when every
    tiling downscales, the least downscaling; ties to the fewest crops, then fewer rows."""
    tilings = sorted(
        ((i, j) for i in range(1, max_num_patches + 1) for j in range(1, max_num_patches + 1) if i * j <= max_num_patches),
        key=lambda t: (t[0] * t[1], t[0]),
    )
    candidates = np.array(tilings, dtype=np.int32)
    resolutions = (candidates * patch_size).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.min(resolutions / np.array([h, w], dtype=np.float32), axis=-1, keepdims=True)
    if np.all(scale < 1):
        ix = int(np.argmax(scale))
    else:
        ix = int(np.argmin(np.where(scale < 1.0, 10e9, scale)))
    return int(candidates[ix][0]), int(candidates[ix][1])


def fit_size(height: int, width: int, out_h: int, out_w: int) -> tuple[int, int]:
    """(scaled_h, scaled_w) of `resize_and_pad`: the aspect-kept fit, in float32, truncated."""
    sy = np.float32(out_h) / np.float32(height)
    sx = np.float32(out_w) / np.float32(width)
    s = min(sx, sy)
    return int(np.float32(height) * s), int(np.float32(width) * s)


def tf_resize_spans(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """TensorFlow `ScaleAndTranslate` spans of an antialiased triangle (bilinear) resize along one
    axis, translation 0: (starts int32 [out], weights float32 [out, span]); output o reads input
    starts[o] + i with weight weights[o, i] (0 past the span). All float32, as TF computes them."""
    f32 = np.float32
    scale = f32(out_size) / f32(in_size)
    inv_scale = f32(1.0) / scale
    kernel_scale = max(inv_scale, f32(1.0))  # antialias: widen the kernel when downscaling
    radius = f32(1.0) * kernel_scale
    span = min(2 * int(math.ceil(radius)) + 1, in_size)
    one_over_kernel_scale = f32(1.0) / kernel_scale
    sample = (np.arange(out_size, dtype=f32) + f32(0.5)) * inv_scale  # [out]
    start = np.clip(np.ceil(sample - radius - f32(0.5)).astype(np.int64), 0, in_size - 1)
    end = np.clip(np.floor(sample + radius - f32(0.5)).astype(np.int64), 0, in_size - 1) + 1
    taps = start[:, None] + np.arange(span)[None, :]  # [out, span]
    pos = (taps.astype(f32) + f32(0.5) - sample[:, None]) * one_over_kernel_scale
    weights = np.maximum(f32(1.0) - np.abs(pos), f32(0.0)).astype(f32)
    weights[taps >= end[:, None]] = 0.0
    # TF sums the weights in tap order (float32) and scales by the reciprocal of the sum.
    total = np.zeros(out_size, dtype=f32)
    for i in range(span):
        total = (total + weights[:, i]).astype(f32)
    ok = np.abs(total) >= f32(1000.0) * np.finfo(f32).tiny
    recip = np.where(ok, f32(1.0) / np.where(ok, total, f32(1.0)), f32(0.0)).astype(f32)
    return start.astype(np.int32), (weights * recip[:, None]).astype(f32)


@dataclass(frozen=True)
class ResizePlan:
    """One `kernels.resize_patchify` call: the image resized to (len(y_starts), len(x_starts))
    at `place` on a zero canvas, crops at `origins` (int32 [n, 2])."""

    y_starts: np.ndarray
    y_weights: np.ndarray
    x_starts: np.ndarray
    x_weights: np.ndarray
    place: tuple[int, int]
    origins: np.ndarray


@dataclass(frozen=True)
class MolmoImageProcessor:
    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)
    base_image_input_size: tuple[int, int] = (336, 336)
    image_token_length_w: int = 12
    image_token_length_h: int = 12
    image_patch_size: int = 14
    image_padding_mask: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "overlap_margins", tuple(int(m) for m in self.overlap_margins))
        size = self.base_image_input_size
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        object.__setattr__(self, "base_image_input_size", size)
        left, right = self.overlap_margins
        crop_patches = size[0] // self.image_patch_size
        if left % 2 or right % 2 or left < 0 or right < 0 or crop_patches % 2:
            # The official code asserts an even left margin and fails later (its feature count
            # check) unless the crop windows pool into whole 2x2 cells as well.
            raise ValueError(f"overlap_margins {self.overlap_margins} and {crop_patches} patches per crop side must "
                             "be even (2x2 pooling)")
        if size[0] != size[1]:
            raise ValueError(f"base_image_input_size {size} must be square")
        if (crop_patches + 1) // 2 != self.image_token_length_h or (crop_patches + 1) // 2 != self.image_token_length_w:
            raise ValueError("image_token_length_h/w must be half the patches per crop side (2x2 pooling)")
        if crop_patches - left - right < 1 or self.max_crops < 1:
            raise ValueError("overlap_margins leave no crop window, or max_crops < 1")
        if not self.image_padding_mask:
            raise ValueError("image_padding_mask false is not supported: Molmo's pad embeddings need the masks")

    @classmethod
    def from_tokenizer_config(cls, tokenizer_config: dict[str, Any]) -> MolmoImageProcessor:
        return cls(**{k: tokenizer_config[k] for k in IMAGES_KWARGS if tokenizer_config.get(k) is not None})

    def settings_key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    # --- geometry ------------------------------------------------------------------------

    @property
    def crop_size(self) -> int:
        return self.base_image_input_size[0]

    @property
    def crop_patches(self) -> int:
        return self.crop_size // self.image_patch_size

    @property
    def window_patches(self) -> int:
        return self.crop_patches - sum(self.overlap_margins)

    def tiling(self, height: int, width: int) -> tuple[int, int]:
        margin_px = self.image_patch_size * sum(self.overlap_margins)
        window_px = self.window_patches * self.image_patch_size
        return select_tiling(height - margin_px, width - margin_px, window_px, self.max_crops)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of <im_patch> tokens of the high-res block."""
        rows, cols = self.tiling(height, width)
        margins = sum(self.overlap_margins)
        h = rows * self.window_patches + margins
        w = cols * self.window_patches + margins
        return (h + 1) // 2, (w + 1) // 2

    def num_tokens(self, height: int, width: int) -> int:
        """Prompt tokens of one image: the global block and the high-res block."""
        th, tw = self.token_grid(height, width)
        return (2 + self.image_token_length_h * (self.image_token_length_w + 1)) + (2 + th * (tw + 1))

    def _resize_plan(self, height: int, width: int, out_h: int, out_w: int, origins: np.ndarray) -> tuple[ResizePlan, np.ndarray]:
        sh, sw = fit_size(height, width, out_h, out_w)
        if sh < 1 or sw < 1:
            raise ValueError(
                f"image {width}x{height} has too extreme an aspect ratio: it resizes to {sw}x{sh} pixels inside "
                f"{out_w}x{out_h}; crop or pad it first"
            )
        top, left = (out_h - sh) // 2, (out_w - sw) // 2
        ys, yw = tf_resize_spans(height, sh)
        xs, xw = tf_resize_spans(width, sw)
        mask = np.zeros((out_h, out_w), dtype=bool)
        mask[top : top + sh, left : left + sw] = True
        return ResizePlan(ys, yw, xs, xw, (top, left), origins.astype(np.int32)), mask

    def plan(self, height: int, width: int, tokens: dict[str, int]) -> dict[str, Any]:
        """Everything but the pixels, for an image of height x width. `tokens`: ids of im_start,
        im_end, im_patch, im_col. Returns a dict with
          "tokens":       int64 [n] the image's prompt tokens (global block, then high-res);
          "feature_rows": int32 [n_crops + 1, tokens_per_crop]: for pooled feature t of crop c
                          (crop 0 the global image), its row among the block's <im_patch>
                          positions (in prompt order), -1 where unused (overlap margins);
          "image_masks":  float32 [n_crops + 1, patches_per_crop], the official masks,
                          misaligned as the official ones are (row c is the high-res crop c's,
                          the last row -1);
          "global", "tiled": ResizePlan of each resize."""
        if height < 1 or width < 1:
            raise ValueError(f"image must have a positive size, got {width}x{height}")
        p, cs = self.image_patch_size, self.crop_size
        left_m, right_m = self.overlap_margins
        rows, cols = self.tiling(height, width)
        window_px = self.window_patches * p
        margin_px = p * (left_m + right_m)
        origins = np.array([(i * window_px, j * window_px) for i in range(rows) for j in range(cols)], dtype=np.int32)
        tiled, mask = self._resize_plan(height, width, rows * window_px + margin_px, cols * window_px + margin_px, origins)
        glob, _ = self._resize_plan(height, width, cs, cs, np.zeros((1, 2), dtype=np.int32))

        # Padding masks: per patch, the fraction of its pixels inside the resized image.
        n = self.crop_patches
        crops = np.stack([mask[t : t + cs, l : l + cs] for t, l in origins])
        fractions = crops.reshape(len(origins), n, p, n, p).transpose(0, 1, 3, 2, 4).reshape(len(origins), n * n, p * p)
        masks = fractions.astype(np.float32).mean(axis=-1)
        masks = np.pad(masks, [[0, 1], [0, 0]], constant_values=-1)  # the official (misaligned) padding row

        # Pooled features of crop (i, j) fill a rectangle of the high-res token grid, crop by
        # crop; within a crop the valid cells start at (y0, x0) of its 12 x 12 pooled grid.
        th, tw = self.image_token_length_h, self.image_token_length_w
        grid_h, grid_w = self.token_grid(height, width)
        per_crop = th * tw
        feature_cell = np.full((rows * cols, per_crop), -1, dtype=np.int64)  # raster cell of the grid
        row0 = 0
        for i in range(rows):
            y0 = 0 if i == 0 else left_m // 2
            ch = self.window_patches + (left_m if i == 0 else 0) + (right_m if i == rows - 1 else 0)
            ph = (ch + 1) // 2
            col0 = 0
            for j in range(cols):
                x0 = 0 if j == 0 else left_m // 2
                cw = self.window_patches + (left_m if j == 0 else 0) + (right_m if j == cols - 1 else 0)
                pw = (cw + 1) // 2
                if y0 + ph > th or x0 + pw > tw:
                    raise ValueError(f"overlap_margins {self.overlap_margins} do not fit the pooled crop grid")
                a, b = np.meshgrid(np.arange(ph), np.arange(pw), indexing="ij")
                cells = (row0 + a) * grid_w + (col0 + b)
                feature_cell[i * cols + j, ((y0 + a) * tw + (x0 + b)).ravel()] = cells.ravel()
                col0 += pw
            row0 += ph
        if row0 != grid_h or col0 != grid_w:
            raise AssertionError(f"crops cover {row0}x{col0} pooled cells, the token grid is {grid_h}x{grid_w}")
        valid = feature_cell >= 0
        if valid.sum() != grid_h * grid_w or np.unique(feature_cell[valid]).size != grid_h * grid_w:
            raise AssertionError("crop features do not map one to one onto the token grid")
        # <im_patch> rows in prompt order: the global block's th*tw cells, then the grid's raster.
        feature_rows = np.full((rows * cols + 1, per_crop), -1, dtype=np.int32)
        feature_rows[0] = np.arange(per_crop)
        feature_rows[1:][valid] = per_crop + feature_cell[valid]

        start, end, patch, col = (tokens[k] for k in ("im_start", "im_end", "im_patch", "im_col"))
        glob_rows = np.tile(np.array([patch] * tw + [col]), th)
        hi_rows = np.tile(np.array([patch] * grid_w + [col]), grid_h)
        ids = np.concatenate([[start], glob_rows, [end], [start], hi_rows, [end]]).astype(np.int64)
        return {"tokens": ids, "feature_rows": feature_rows, "image_masks": masks, "global": glob, "tiled": tiled}

    def content_hash(self, pixels: np.ndarray) -> str:
        """sha256 of the uint8 pixels, their shape and every setting."""
        h = hashlib.sha256(b"molmo-image")
        h.update(repr(pixels.shape).encode())
        h.update(self.settings_key().encode())
        h.update(np.ascontiguousarray(pixels).tobytes())
        return h.hexdigest()


def writable(array: np.ndarray) -> np.ndarray:
    """Items are shared read-only (PIL and unpickled arrays are): torch.from_numpy wants a
    writable array, so those are copied (a decoded image or a few KB of spans)."""
    array = np.ascontiguousarray(array)
    return array if array.flags.writeable else array.copy()


def crops_from_plan(pixels: torch.Tensor, plan: dict[str, Any], processor: MolmoImageProcessor) -> torch.Tensor:
    """uint8 [H, W, 3] (any device) → the official `images` float32 [n_crops + 1, 576, 588]
    (global crop first), through `kernels.resize_patchify` (dispatch picks Triton on CUDA)."""
    from vlmserve import kernels

    dev = pixels.device
    levels = torch.from_numpy(LEVELS).to(dev)
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float32, device=dev)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float32, device=dev)
    out = []
    for key in ("global", "tiled"):
        rp: ResizePlan = plan[key]
        t = [torch.from_numpy(writable(a)).to(dev) for a in (rp.y_starts, rp.y_weights, rp.x_starts, rp.x_weights, rp.origins)]
        out.append(kernels.resize_patchify(pixels, levels, t[0], t[1], t[2], t[3], mean, std, t[4], rp.place,
                                           processor.crop_size, processor.image_patch_size))
    return torch.cat(out)


def reference_crops(pixels: np.ndarray, plan: dict[str, Any], processor: MolmoImageProcessor) -> torch.Tensor:
    """`crops_from_plan` on the CPU through the PyTorch reference (tests, parity)."""
    from vlmserve import kernels

    saved = kernels.get_backend()
    kernels.set_backend("torch")
    try:
        return crops_from_plan(torch.from_numpy(writable(pixels)), plan, processor)
    finally:
        kernels.set_backend(saved)
