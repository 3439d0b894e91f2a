"""NVLM-D's image preprocessing: the NVLM-D-72B model card's `load_image` (dynamic tiling by
aspect ratio, plus a thumbnail), without torchvision.

The card's steps, reproduced exactly:
  1. `dynamic_preprocess`: among the grids (cols, rows) with min_num <= cols * rows <= max_num,
     pick the one whose aspect ratio is closest to the image's (`find_closest_aspect_ratio`,
     ties to the later, larger grid only when the image is big enough); PIL-resize the image
     (bicubic, Pillow's default for RGB) to (cols * S, rows * S) and cut it into S x S tiles,
     row-major; when there is more than one tile and use_thumbnail is set, add the whole image
     resized to S x S, last;
  2. `build_transform`: each tile is already S x S (its `Resize` is a copy), then
     `ToTensor` (uint8 / 255 in float32) and `Normalize` (ImageNet mean/std, float32).
Step 1 runs in the front end and yields uint8 tiles [T, S, S, 3]; step 2 is a lookup in a
float32 [3, 256] table (`lut`, built with torchvision's exact float32 arithmetic, so bit-
identical), applied on the model's device by `kernels.normalize_patchify` ("patches" layout:
each tile's patches row-major, (C, P, P) columns: the Conv2d patch embedding's order).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """The card's candidate grids, in its order: a set sorted (stably) by tile count. The set's
    iteration order decides ties between equal-area grids, so it is built the same way."""
    ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(ratios, key=lambda x: x[0] * x[1])


def find_closest_aspect_ratio(
    aspect_ratio: float, ratios: list[tuple[int, int]], width: int, height: int, image_size: int
) -> tuple[int, int]:
    """(cols, rows): the card's `find_closest_aspect_ratio`, operation for operation."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def torchvision_normalize_lut(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """float32 [3, 256]: entry [c, v] is `Normalize(mean, std)(ToTensor()(v))[c]` exactly:
    float32(v) / 255, minus float32 mean, divided by float32 std."""
    levels = torch.arange(256, dtype=torch.float32).div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1)
    return levels.view(1, 256).sub(mean_t).div(std_t).contiguous()


@dataclass(frozen=True)
class NVLMDImageProcessor:
    image_size: int = 448  # tile side S
    min_num: int = 1
    max_num: int = 6
    use_thumbnail: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    lut: torch.Tensor = field(init=False, repr=False, compare=False)
    lut_array: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_mean", tuple(float(m) for m in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(s) for s in self.image_std))
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values (RGB), got {self.image_mean}, {self.image_std}")
        if not 1 <= self.min_num <= self.max_num:
            raise ValueError(f"tile counts need 1 <= min ({self.min_num}) <= max ({self.max_num})")
        lut = torchvision_normalize_lut(self.image_mean, self.image_std)
        object.__setattr__(self, "lut", lut)
        object.__setattr__(self, "lut_array", lut.numpy())

    def settings_key(self) -> str:
        """Every setting that shapes the encoder input, as a stable string (content hashes)."""
        return json.dumps(
            [self.image_size, self.min_num, self.max_num, self.use_thumbnail, self.image_mean, self.image_std]
        )

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(cols, rows) of the tiling of a width x height image."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image must have a positive size, got {width}x{height}")
        ratios = target_ratios(self.min_num, self.max_num)
        return find_closest_aspect_ratio(width / height, ratios, width, height, self.image_size)

    def num_tiles(self, width: int, height: int) -> int:
        """Tiles the encoder sees for one image, the thumbnail included."""
        cols, rows = self.grid(width, height)
        blocks = cols * rows
        return blocks + (1 if self.use_thumbnail and blocks != 1 else 0)

    def tiles(self, image: Image.Image) -> np.ndarray:
        """uint8 [T, S, S, 3]: the grid's tiles row-major, then the thumbnail (if any)."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        s = self.image_size
        cols, rows = self.grid(image.width, image.height)
        resized = np.asarray(image.resize((cols * s, rows * s), resample=Image.Resampling.BICUBIC))
        # [rows*S, cols*S, 3] -> [rows, cols, S, S, 3] -> row-major tiles.
        out = resized.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, 3)
        if self.use_thumbnail and rows * cols != 1:
            thumb = np.asarray(image.resize((s, s), resample=Image.Resampling.BICUBIC))
            out = np.concatenate([out, thumb[None]], axis=0)
        return np.ascontiguousarray(out)

    def content_hash(self, tiles: np.ndarray) -> str:
        """sha256 (hex) of the tiles' shape, the settings and the uint8 pixels."""
        h = hashlib.sha256()
        h.update(b"nvlm_d image")
        h.update(repr(tiles.shape).encode())
        h.update(self.settings_key().encode())
        h.update(np.ascontiguousarray(tiles).tobytes())
        return h.hexdigest()

    def pixel_values(self, tiles: np.ndarray) -> torch.Tensor:
        """float32 [T, 3, S, S]: the card's `load_image` output, on the CPU (parity checks)."""
        idx = torch.from_numpy(np.ascontiguousarray(tiles)).long()  # [T, S, S, 3]
        values = torch.stack([self.lut[c][idx[..., c]] for c in range(3)], dim=1)
        return values
