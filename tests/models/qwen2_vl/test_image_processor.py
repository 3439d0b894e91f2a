"""Our Qwen2-VL image processor against transformers'.

Reference: `transformers.Qwen2VLImageProcessor.from_pretrained`. Without torchvision (our CPU
environment) transformers falls back to `Qwen2VLImageProcessorPil`, its PIL/NumPy backend;
that is the class these tests compare against (`test_reference_is_the_pil_backend` records it).
pixel_values must be bit-identical and image_grid_thw equal.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmserve.models.qwen2_vl.image_processor import Qwen2VLImageProcessor, smart_resize
from vlmserve.models.qwen2_vl.tiny import make_tiny_qwen2_vl

SMALL_MAX_PIXELS = 28 * 28 * 64  # keeps "exceeds max_pixels" cases cheap


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"))


def hf_processor(tiny_dir: Path, **kwargs):
    from transformers import Qwen2VLImageProcessor as HFQwen2VLImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HFQwen2VLImageProcessor.from_pretrained(tiny_dir, **kwargs)


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    # Smooth gradients plus noise: bicubic resize exercises both flat and busy regions.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), (xx + yy) % 256], -1)
    noisy = base + rng.integers(-40, 41, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def assert_matches_hf(ours: Qwen2VLImageProcessor, hf, image: Image.Image) -> tuple[int, int, int]:
    expected = hf(images=[image], return_tensors="pt")
    pixel_values, grid = ours.preprocess_image(image)
    assert grid == tuple(expected["image_grid_thw"][0].tolist())
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == expected["pixel_values"].shape
    diff = (pixel_values - expected["pixel_values"]).abs().max().item()
    assert torch.equal(pixel_values, expected["pixel_values"]), f"max abs diff {diff} for {image.size}"
    return grid


def test_reference_is_the_pil_backend(tiny_dir: Path) -> None:
    assert type(hf_processor(tiny_dir)).__name__ in ("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor")


@pytest.mark.parametrize(
    ("height", "width"),
    [
        (333, 517),  # odd sizes: both sides rounded to multiples of 28
        (20, 20),  # tiny: upscaled to min_pixels
        (56, 56),  # already aligned: resize is the identity size
        (28, 1400),  # very wide (50:1)
        (1000, 90),  # tall
        (612, 431),
    ],
)
def test_pixel_values_and_grid_match_transformers(tiny_dir: Path, height: int, width: int) -> None:
    config = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    ours = Qwen2VLImageProcessor.from_preprocessor_config(config)
    assert_matches_hf(ours, hf_processor(tiny_dir), random_image(height, width, seed=height * width))


def test_image_over_max_pixels_is_downscaled_like_transformers(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    ours = Qwen2VLImageProcessor.from_preprocessor_config(config, {"max_pixels": SMALL_MAX_PIXELS})
    hf = hf_processor(tiny_dir, max_pixels=SMALL_MAX_PIXELS)
    t, gh, gw = assert_matches_hf(ours, hf, random_image(480, 640, seed=7))
    assert gh * gw * 14 * 14 <= SMALL_MAX_PIXELS
    assert (gh * 14, gw * 14) == smart_resize(480, 640, 28, 3136, SMALL_MAX_PIXELS)


def test_grayscale_converted_to_rgb_matches_transformers(tiny_dir: Path) -> None:
    config = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    ours = Qwen2VLImageProcessor.from_preprocessor_config(config)
    gray = random_image(150, 210, seed=3).convert("L").convert("RGB")
    assert_matches_hf(ours, hf_processor(tiny_dir), gray)


def test_non_rgb_image_is_rejected_with_the_fix() -> None:
    with pytest.raises(ValueError, match="convert"):
        Qwen2VLImageProcessor().preprocess_image(Image.new("L", (30, 30)))


def test_smart_resize_bounds_and_multiples() -> None:
    for h, w in [(20, 20), (333, 517), (4000, 3000), (28, 5000)]:
        rh, rw = smart_resize(h, w, 28, 3136, 1003520)
        assert rh % 28 == 0 and rw % 28 == 0
        assert 3136 <= rh * rw <= 1003520


def test_smart_resize_rejects_extreme_aspect_ratio() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)


def test_reads_published_and_newer_size_layouts_and_overrides() -> None:
    published = {"min_pixels": 1000, "max_pixels": 50000, "patch_size": 14, "merge_size": 2}
    newer = {"size": {"shortest_edge": 1000, "longest_edge": 50000}, "patch_size": 14, "merge_size": 2}
    a = Qwen2VLImageProcessor.from_preprocessor_config(published)
    b = Qwen2VLImageProcessor.from_preprocessor_config(newer)
    assert (a.min_pixels, a.max_pixels) == (b.min_pixels, b.max_pixels) == (1000, 50000)
    c = Qwen2VLImageProcessor.from_preprocessor_config(newer, {"max_pixels": 9000, "min_pixels": None})
    assert (c.min_pixels, c.max_pixels) == (1000, 9000)
    assert a.settings_key() != c.settings_key()
    with pytest.raises(ValueError, match="max-pixels"):
        Qwen2VLImageProcessor(min_pixels=10_000, max_pixels=5_000)


def test_num_tokens_counts_merged_patches() -> None:
    ours = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=1003520)
    _, (t, gh, gw) = ours.preprocess_image(random_image(333, 517))
    assert ours.num_tokens(333, 517) == t * gh * gw // 4 == 24 * 36 // 4


def test_patch_rows_follow_merge_windows() -> None:
    """Row r of pixel_values is patch (window_row, window_col, merge_h, merge_w) in that order."""
    ours = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 112, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    pixels = np.zeros((56, 112, 3), dtype=np.uint8)
    for row in range(4):
        for col in range(8):
            pixels[row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14] = row * 8 + col
    values, grid = ours.normalize_patchify(pixels)
    assert grid == (1, 4, 8)
    order = [round(v * 255) for v in values[:, 0].tolist()]
    expected = [
        (wr * 2 + mh) * 8 + wc * 2 + mw for wr in range(2) for wc in range(4) for mh in range(2) for mw in range(2)
    ]
    assert order == expected
