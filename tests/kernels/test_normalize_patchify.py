import numpy as np
import pytest
import torch

from kernels import reference
from kernels.normalize_patchify import normalize_patchify

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _image(h, w, device):
    return torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, device=device)


def test_reference_matches_transformers_qwen2_vl_processor():
    # The processor's own rescale, normalise and merge-window patch permutation, on an image
    # already at a multiple of 28 (so resizing is skipped on both sides).
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = _image(56, 84, "cpu")
    proc = Qwen2VLImageProcessorPil(do_resize=False)
    feats = proc(images=Image.fromarray(img.numpy()), return_tensors="np")
    assert feats["image_grid_thw"].tolist() == [[1, 4, 6]]
    want = torch.from_numpy(np.asarray(feats["pixel_values"], dtype=np.float32))
    got = reference.normalize_patchify(
        img, tuple(proc.image_mean), tuple(proc.image_std), proc.patch_size, proc.merge_size,
        proc.temporal_patch_size, "qwen2_vl",
    )
    assert got.shape == want.shape == (24, 3 * 2 * 14 * 14)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("h,w,patch,merge,temporal", [(56, 84, 14, 2, 2), (28, 28, 14, 2, 1), (32, 64, 8, 2, 2)])
def test_qwen2_vl_layout_matches_reference(h, w, patch, merge, temporal, out_dtype, device, tol, poisoned):
    img = _image(h, w, device)
    n, cols = (h // patch) * (w // patch), 3 * temporal * patch * patch
    got = normalize_patchify(img, CLIP_MEAN, CLIP_STD, patch, merge, temporal, "qwen2_vl", out_dtype,
                             out=poisoned((n, cols), out_dtype, device))
    want = reference.normalize_patchify(img, CLIP_MEAN, CLIP_STD, patch, merge, temporal, "qwen2_vl", out_dtype)
    torch.testing.assert_close(got, want, **tol(out_dtype, scale=0.5))


@pytest.mark.parametrize("h,w,patch", [(48, 80, 16), (14, 42, 14)])
def test_plain_patch_layout_matches_reference_on_strided_image(h, w, patch, device, tol, poisoned):
    # A crop of a larger image: non-contiguous rows.
    img = _image(h + 5, w + 7, device)[3:3 + h, 2:2 + w]
    n, cols = (h // patch) * (w // patch), 3 * patch * patch
    got = normalize_patchify(img, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5), patch, layout="patches",
                             out=poisoned((n, cols), torch.float32, device))
    want = reference.normalize_patchify(img, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5), patch, layout="patches")
    torch.testing.assert_close(got, want, **tol(torch.float32))
    # Row 1 is the patch right of the first one, channel 0 first: a Conv2d patch order.
    manual = (img[:patch, patch:2 * patch, 0].float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(got[1, : patch * patch].view(patch, patch), manual, **tol(torch.float32))


def test_normalize_patchify_explains_unaligned_image(device):
    with pytest.raises(ValueError, match="multiple of patch_size \\* merge_size = 28"):
        normalize_patchify(_image(30, 56, device), CLIP_MEAN, CLIP_STD, 14, 2, 2)


def test_normalize_patchify_rejects_unknown_layout(device):
    with pytest.raises(ValueError, match="layout must be one of"):
        normalize_patchify(_image(28, 28, device), CLIP_MEAN, CLIP_STD, 14, 2, 2, layout="pixtral")
