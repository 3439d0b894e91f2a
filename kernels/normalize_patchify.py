"""normalize_patchify: resized uint8 pixels already on the device → normalised float patches in a
vision tower's input layout, in one pass. Resizing stays on the host; the host ships uint8
(a quarter of float32's bytes) and the device does the rest.

Normalisation is a lookup in a float32 [3, 256] table (`reference.normalize_lut`, or a family's
own), not arithmetic: a table built with the reference processor's arithmetic makes the output
bit-identical to it, whatever that arithmetic is (numpy's float64 rescale, torchvision's fused
form), with no dependence on the GPU's division or FMA contraction.

Layouts (see `reference.normalize_patchify`): "qwen2_vl" (merge-window row order, temporal
patches of consecutive frames, a single image repeated over the temporal patch) and "patches"
(row-major patches, (C, P, P) columns). "patches" is "qwen2_vl" with merge 1 and one frame, so
one kernel serves both. Pixtral feeds "patches" to its tower's patch embedding; Mllama runs
"patches" over its whole tile canvas with the tower's patch size and permutes the patches into
tiles (a 560 px tile as one "patch" would be a 940k-column row, too wide for one program).
Other tile layouts (CLIP, InternViT) become new row/column maps here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmserve.kernels import _interpreter as _it
from vlmserve.kernels.reference import check_patchify_args
from vlmserve.kernels.tuning import launch_config


@triton.jit
def _normalize_patchify_kernel(
    px_ptr, lut_ptr, out_ptr, n_rows, grid_h, grid_w,
    stride_t, stride_h, stride_w, stride_c, stride_out,
    P: tl.constexpr, MERGE: tl.constexpr, TEMPORAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tile [BLOCK_R output rows (patches), BLOCK_K >= 3*P*P pixel columns (c, py, px)].
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    # Row → (temporal patch, patch gy, patch gx): frames' grids one after another, each in
    # MERGE×MERGE windows in row-major window order, row-major inside a window.
    per_frame = grid_h * grid_w
    tpatch = r // per_frame
    rf = r % per_frame
    win = rf // (MERGE * MERGE)
    inner = rf % (MERGE * MERGE)
    wins_per_row = grid_w // MERGE
    gy = (win // wins_per_row) * MERGE + inner // MERGE
    gx = (win % wins_per_row) * MERGE + inner % MERGE
    k = tl.arange(0, BLOCK_K)
    c = k // (P * P)
    py = (k // P) % P
    px = k % P
    mask = (r < n_rows)[:, None] & (k < 3 * P * P)[None, :]
    y = (gy * P)[:, None] + py[None, :]
    x = (gx * P)[:, None] + px[None, :]
    src = px_ptr + y.to(tl.int64) * stride_h + x * stride_w + (c * stride_c)[None, :]
    lut_row = (c * 256)[None, :]
    # Output column of frame t of the temporal patch: (c, t, py, px) flattened.
    col = c * (TEMPORAL * P * P) + py * P + px
    dst = out_ptr + r.to(tl.int64)[:, None] * stride_out + col[None, :]
    for t in tl.static_range(TEMPORAL):
        frame = (tpatch * TEMPORAL + t).to(tl.int64)  # stride_t is 0 for a single image
        pix = tl.load(src + (frame * stride_t)[:, None], mask=mask, other=0)
        val = tl.load(lut_ptr + lut_row + pix.to(tl.int32), mask=mask, other=0.0)
        tl.store(dst + t * P * P, val.to(out_ptr.dtype.element_ty), mask=mask)


def normalize_patchify(
    pixels: torch.Tensor,
    lut: torch.Tensor,
    patch_size: int,
    merge_size: int = 1,
    temporal_patch_size: int = 1,
    layout: str = "qwen2_vl",
    out_dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """pixels uint8 [H, W, 3] (one image) or [T, H, W, 3] (frames, T % temporal_patch_size == 0),
    any strides; lut float32 [3, 256], contiguous. Returns
    [grid_t * grid_h * grid_w, 3 * temporal_patch_size * P * P] of out_dtype."""
    op = "normalize_patchify"
    _it.check_device(op, pixels)
    grid_t, grid_h, grid_w = check_patchify_args(pixels, lut, patch_size, merge_size, temporal_patch_size, layout)
    if not lut.is_contiguous():
        raise ValueError(f"{op}: lut must be contiguous")
    if out_dtype not in _it.FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    # One image: a temporal patch of tp identical frames, i.e. frame stride 0.
    stride_t = pixels.stride(0) if pixels.dim() == 4 else 0
    stride_h, stride_w, stride_c = pixels.stride()[-3:]
    n_rows, n_cols = grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size * patch_size
    if out is None:
        out = torch.empty((n_rows, n_cols), dtype=out_dtype, device=pixels.device)
    elif tuple(out.shape) != (n_rows, n_cols) or out.dtype != out_dtype or out.stride(1) != 1:
        raise ValueError(f"{op}: out must be [{n_rows}, {n_cols}] {out_dtype} with contiguous rows")
    cfg = launch_config(op, {"block_rows": 4, "num_warps": 4})
    block_r = max(1, min(cfg["block_rows"], triton.next_power_of_2(n_rows)))
    grid = (triton.cdiv(n_rows, block_r),)
    _normalize_patchify_kernel[grid](
        pixels, lut, out, n_rows, grid_h, grid_w,
        stride_t, stride_h, stride_w, stride_c, out.stride(0),
        P=patch_size, MERGE=merge_size, TEMPORAL=temporal_patch_size,
        BLOCK_R=block_r, BLOCK_K=triton.next_power_of_2(3 * patch_size * patch_size),
        num_warps=cfg.get("num_warps", 4),
    )
    return out
