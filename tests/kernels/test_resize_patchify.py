"""resize_patchify: the Triton kernel against the PyTorch reference on random images and span
tables (TensorFlow's antialiased bilinear spans: down, up and unit scale), strided inputs,
overlapping crops off the canvas' edges; and the reference against the official Molmo output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmserve.kernels import reference
from vlmserve.kernels.resize_patchify import resize_patchify
from vlmserve.models.molmo.image_processor import LEVELS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, tf_resize_spans

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _args(src_hw, out_hw, place, origins, seed, strided=False):
    gen = torch.Generator().manual_seed(seed)
    h, w = src_hw
    if strided:  # a column-cropped view of a wider image: non-contiguous rows
        pixels = torch.randint(0, 256, (h, w + 7, 3), dtype=torch.uint8, generator=gen)[:, 3 : 3 + w]
    else:
        pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=gen)
    ys, yw = tf_resize_spans(h, out_hw[0])
    xs, xw = tf_resize_spans(w, out_hw[1])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DEV)  # noqa: E731
    return (pixels.to(DEV), t(LEVELS), t(ys), t(yw), t(xs), t(xw),
            torch.tensor(OPENAI_CLIP_MEAN, device=DEV), torch.tensor(OPENAI_CLIP_STD, device=DEV),
            torch.tensor(origins, dtype=torch.int32, device=DEV), place)


@pytest.mark.parametrize(
    "src_hw, out_hw, place, origins, strided",
    [
        ((53, 41), (20, 15), (4, 6), [[0, 0], [14, 0], [0, 14]], False),  # downscale, padded canvas
        ((17, 23), (40, 54), (0, 1), [[0, 0], [12, 26]], True),  # upscale, strided pixels
        ((28, 42), (28, 42), (0, 0), [[0, 0], [0, 14]], False),  # unit scale
    ],
)
def test_triton_matches_reference(src_hw, out_hw, place, origins, strided):
    args = _args(src_hw, out_hw, place, origins, seed=sum(src_hw), strided=strided)
    want = reference.resize_patchify(*args, crop_size=28, patch_size=14)
    got = resize_patchify(*args, crop_size=28, patch_size=14)
    assert got.shape == want.shape == (len(origins), 4, 14 * 14 * 3)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-6)
    # Padding (outside the resized image) is exactly the normalised zero.
    assert torch.isfinite(got).all() and got.std() > 0.1


def test_unit_scale_spans_copy_the_pixels():
    starts, weights = tf_resize_spans(9, 9)
    rows = np.arange(9)
    one_hot = np.zeros((9, 9), dtype=np.float32)
    for r in rows:
        taps = starts[r] + np.arange(weights.shape[1])
        one_hot[r, taps[weights[r] > 0]] = weights[r][weights[r] > 0]
    np.testing.assert_array_equal(one_hot, np.eye(9, dtype=np.float32))


@pytest.mark.parametrize("src, dst", [(500, 336), (375, 12), (40, 560), (7, 3)])
def test_spans_are_normalised_and_within_the_image(src, dst):
    starts, weights = tf_resize_spans(src, dst)
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)
    last = starts[:, None] + np.arange(weights.shape[1])[None, :]
    assert starts.min() >= 0 and (last[weights > 0] < src).all()


def test_reference_rejects_bad_inputs():
    args = list(_args((20, 20), (10, 10), (0, 0), [[0, 0]], seed=0))
    with pytest.raises(ValueError, match="pixels must be"):
        reference.resize_patchify(args[0].float(), *args[1:], crop_size=14, patch_size=14)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        reference.resize_patchify(*args, crop_size=20, patch_size=14)
