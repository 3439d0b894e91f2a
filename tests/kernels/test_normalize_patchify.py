import numpy as np
import pytest
import torch

from vlmserve.kernels import reference
from vlmserve.kernels.normalize_patchify import normalize_patchify

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _image(h, w, device, frames=None):
    shape = (h, w, 3) if frames is None else (frames, h, w, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=device)


def _lut(device, mean=CLIP_MEAN, std=CLIP_STD):
    return reference.normalize_lut(mean, std).to(device)


def test_reference_is_bit_identical_to_transformers_qwen2_vl_processor():
    # The processor's own rescale, normalise and merge-window patch permutation, on an image
    # already at a multiple of 28 (so resizing is skipped on both sides).
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = _image(56, 84, "cpu")
    proc = Qwen2VLImageProcessorPil(do_resize=False)
    feats = proc(images=Image.fromarray(img.numpy()), return_tensors="np")
    assert feats["image_grid_thw"].tolist() == [[1, 4, 6]]
    want = torch.from_numpy(np.asarray(feats["pixel_values"], dtype=np.float32))
    lut = reference.normalize_lut(tuple(proc.image_mean), tuple(proc.image_std), proc.rescale_factor)
    got = reference.normalize_patchify(img, lut, proc.patch_size, proc.merge_size, proc.temporal_patch_size)
    assert got.shape == want.shape == (24, 3 * 2 * 14 * 14)
    assert torch.equal(got, want)


def test_normalize_lut_covers_every_level_with_numpy_float64_rescale():
    lut = reference.normalize_lut(CLIP_MEAN, CLIP_STD)
    levels = (np.arange(256, dtype=np.float64) / 255).astype(np.float32)
    want = (levels[None] - np.float32(CLIP_MEAN)[:, None]) / np.float32(CLIP_STD)[:, None]
    assert lut.dtype == torch.float32 and torch.equal(lut, torch.from_numpy(want))


def test_reference_frames_form_temporal_patches_of_consecutive_frames():
    frames = _image(28, 56, "cpu", frames=4)  # 2 temporal patches, grid 2x4 per frame
    lut = _lut("cpu")
    got = reference.normalize_patchify(frames, lut, 14, 2, 2).view(2 * 2 * 4, 3, 2, 14, 14)
    # Row 8 + 5: second temporal patch (frames 2, 3), second window, its row 0 col 1 patch,
    # i.e. patch (gy 0, gx 3); columns (channel, frame in the patch, py, px).
    for t in range(2):
        for c in range(3):
            want = lut[c][frames[2 + t, 0:14, 42:56, c].long()]
            assert torch.equal(got[13, c, t], want)


def test_reference_image_equals_frames_of_the_image_repeated():
    img, lut = _image(56, 84, "cpu"), _lut("cpu")
    still = reference.normalize_patchify(img, lut, 14, 2, 2)
    assert torch.equal(still, reference.normalize_patchify(img.expand(2, *img.shape), lut, 14, 2, 2))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h,w,patch,merge,temporal,frames",
                         [(56, 84, 14, 2, 2, None), (28, 28, 14, 2, 1, None), (32, 64, 8, 2, 2, None),
                          (56, 28, 14, 2, 2, 4), (16, 32, 8, 2, 3, 3)])
def test_qwen2_vl_layout_is_bit_identical_to_reference(h, w, patch, merge, temporal, frames, out_dtype, device,
                                                       poisoned):
    img, lut = _image(h, w, device, frames), _lut(device)
    n = (frames or temporal) // temporal * (h // patch) * (w // patch)
    cols = 3 * temporal * patch * patch
    got = normalize_patchify(img, lut, patch, merge, temporal, "qwen2_vl", out_dtype,
                             out=poisoned((n, cols), out_dtype, device))
    want = reference.normalize_patchify(img, lut, patch, merge, temporal, "qwen2_vl", out_dtype)
    assert got.dtype == want.dtype == out_dtype
    assert torch.equal(got, want)  # a table lookup and one cast: no rounding differences


@pytest.mark.parametrize("h,w,patch", [(48, 80, 16), (14, 42, 14)])
def test_plain_patch_layout_matches_reference_on_strided_image(h, w, patch, device, poisoned):
    # A crop of a larger image: non-contiguous rows.
    img = _image(h + 5, w + 7, device)[3:3 + h, 2:2 + w]
    lut = _lut(device, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5))
    n, cols = (h // patch) * (w // patch), 3 * patch * patch
    got = normalize_patchify(img, lut, patch, layout="patches", out=poisoned((n, cols), torch.float32, device))
    assert torch.equal(got, reference.normalize_patchify(img, lut, patch, layout="patches"))
    # Row 1 is the patch right of the first one, channel 0 first: a Conv2d patch order.
    manual = (img[:patch, patch:2 * patch, 0].double() / 255).float().sub(0.5).div(0.5)
    assert torch.equal(got[1, : patch * patch].view(patch, patch), manual)


@pytest.mark.parametrize("impl", [normalize_patchify, reference.normalize_patchify], ids=["triton", "reference"])
def test_normalize_patchify_explains_bad_inputs(impl, device):
    lut = _lut(device)
    with pytest.raises(ValueError, match="multiple of patch_size \\* merge_size = 28"):
        impl(_image(30, 56, device), lut, 14, 2, 2)
    with pytest.raises(ValueError, match="layout must be one of"):
        impl(_image(28, 28, device), lut, 14, 2, 2, layout="pixtral")
    with pytest.raises(ValueError, match="3 frames is not a positive multiple of temporal_patch_size = 2"):
        impl(_image(28, 28, device, frames=3), lut, 14, 2, 2)
    with pytest.raises(ValueError, match="lut must be float32 \\[3, 256\\]"):
        impl(_image(28, 28, device), lut[:, :255], 14, 2, 2)
