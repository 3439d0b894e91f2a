"""`vlmserve bench-preprocess`: images/s through our Qwen2-VL preprocessing versus
transformers' `Qwen2VLImageProcessor`, on the same images, with the outputs checked equal.

Both sides start from a decoded RGB PIL image and end with `pixel_values` + the grid, on one
thread. A second figure runs ours through a thread pool (the server's media workers).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from vlmserve.models.qwen2_vl.image_processor import Qwen2VLImageProcessor

SIZES = ("224x224", "640x480", "1280x720", "1920x1080", "4032x3024")


def _images(size: str, n: int, seed: int) -> list[Image.Image]:
    w, h = (int(v) for v in size.split("x"))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (max(h // 16, 1), max(w // 16, 1), 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    return out


def _rate(fn, images: list[Image.Image]) -> float:
    t0 = time.perf_counter()
    for img in images:
        fn(img)
    return len(images) / (time.perf_counter() - t0)


def run_preprocess_bench(
    sizes: tuple[str, ...] = SIZES,
    num_images: int = 8,
    min_pixels: int = 3136,
    max_pixels: int = 12845056,
    workers: int = 2,
) -> list[dict]:
    from transformers import Qwen2VLImageProcessor as HFProcessor

    ours = Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    theirs = HFProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    rows = []
    pool_label = f"ours x{workers} thr"
    print(f"{'size':>10} {'tokens':>7} {'ours img/s':>11} {pool_label:>13} {'HF img/s':>9} {'speed-up':>9}  same")
    for size in sizes:
        images = _images(size, num_images, seed=len(rows))
        # Same outputs first (also warms both up).
        pv, grid = ours.preprocess_image(images[0])
        ref = theirs(images=images[0], return_tensors="pt")
        same = torch.equal(pv, ref["pixel_values"].float()) and list(grid) == ref["image_grid_thw"][0].tolist()
        ours_rate = _rate(ours.preprocess_image, images)
        hf_rate = _rate(lambda img: theirs(images=img, return_tensors="pt"), images)
        with ThreadPoolExecutor(workers) as pool:
            t0 = time.perf_counter()
            list(pool.map(ours.preprocess_image, images))
            pool_rate = len(images) / (time.perf_counter() - t0)
        tokens = grid[0] * grid[1] * grid[2] // 4
        rows.append(dict(size=size, tokens=tokens, ours=ours_rate, ours_pool=pool_rate, hf=hf_rate, same=same))
        print(f"{size:>10} {tokens:>7} {ours_rate:>11.1f} {pool_rate:>13.1f} {hf_rate:>9.1f} "
              f"{ours_rate / hf_rate:>8.2f}x  {same}")
    return rows
