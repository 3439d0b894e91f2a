"""normalize_patchify: uint8 pixels [H, W, 3] already on the device (resizing stays on the
host) → normalised float patches in a vision tower's input layout, in one pass.

Layouts (see `reference.normalize_patchify`): "qwen2_vl" (merge-window row order, the image
repeated over the temporal patch) and "patches" (row-major patches, (C, P, P) columns).
"patches" is "qwen2_vl" with merge 1 and one frame, so one kernel serves both; Pixtral,
CLIP or InternViT tile layouts become new row/column maps here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _interpreter as _it
from kernels.reference import PATCH_LAYOUTS
from kernels.tuning import launch_config


@triton.jit
def _normalize_patchify_kernel(
    img_ptr, out_ptr, n_rows, grid_w,
    stride_h, stride_w, stride_c, stride_out,
    mean0, mean1, mean2, std0, std1, std2,
    P: tl.constexpr, MERGE: tl.constexpr, TEMPORAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Tile [BLOCK_R output rows (patches), BLOCK_K >= 3*P*P pixel columns (c, py, px)].
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    # Row → patch (gy, gx): MERGE×MERGE windows in row-major window order, row-major inside.
    win = r // (MERGE * MERGE)
    inner = r % (MERGE * MERGE)
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
    pix = tl.load(img_ptr + y.to(tl.int64) * stride_h + x * stride_w + (c * stride_c)[None, :], mask=mask, other=0)
    mean = tl.where(c == 0, mean0, tl.where(c == 1, mean1, mean2))[None, :]
    std = tl.where(c == 0, std0, tl.where(c == 1, std1, std2))[None, :]
    val = ((pix.to(tl.float32) * (1.0 / 255.0) - mean) / std).to(out_ptr.dtype.element_ty)
    # Output column of frame t: (c, t, py, px) flattened.
    col = c * (TEMPORAL * P * P) + py * P + px
    dst = out_ptr + r.to(tl.int64)[:, None] * stride_out + col[None, :]
    for t in tl.static_range(TEMPORAL):
        tl.store(dst + t * P * P, val, mask=mask)


def normalize_patchify(
    image: torch.Tensor,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    patch_size: int,
    merge_size: int = 1,
    temporal_patch_size: int = 1,
    layout: str = "qwen2_vl",
    out_dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """image uint8 [H, W, 3] (any strides); mean/std: 3 floats each (0–1 pixel scale).
    Returns [grid_h * grid_w, 3 * temporal_patch_size * P * P] of out_dtype."""
    op = "normalize_patchify"
    _it.check_device(op, image)
    if layout not in PATCH_LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {PATCH_LAYOUTS}, got {layout!r}")
    if layout == "patches" and (merge_size != 1 or temporal_patch_size != 1):
        raise ValueError(f"{op}: layout 'patches' takes merge_size = temporal_patch_size = 1, "
                         f"got {merge_size} and {temporal_patch_size}")
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
        raise ValueError(f"{op}: image must be uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
        raise ValueError(f"{op}: mean and std need 3 values each (std non-zero), got {mean} and {std}")
    if out_dtype not in _it.FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    h, w, _ = image.shape
    unit = patch_size * merge_size
    if patch_size < 1 or merge_size < 1 or temporal_patch_size < 1 or h % unit or w % unit or h == 0 or w == 0:
        raise ValueError(
            f"{op}: image {h}x{w} must be a non-empty multiple of patch_size * merge_size = {unit} on both "
            "sides; resize it on the host first (e.g. Qwen2-VL's smart_resize)"
        )
    grid_h, grid_w = h // patch_size, w // patch_size
    n_rows, n_cols = grid_h * grid_w, 3 * temporal_patch_size * patch_size * patch_size
    if out is None:
        out = torch.empty((n_rows, n_cols), dtype=out_dtype, device=image.device)
    elif tuple(out.shape) != (n_rows, n_cols) or out.dtype != out_dtype or out.stride(1) != 1:
        raise ValueError(f"{op}: out must be [{n_rows}, {n_cols}] {out_dtype} with contiguous rows")
    cfg = launch_config(op, {"block_rows": 4, "num_warps": 4})
    block_r = max(1, min(cfg["block_rows"], triton.next_power_of_2(n_rows)))
    grid = (triton.cdiv(n_rows, block_r),)
    _normalize_patchify_kernel[grid](
        image, out, n_rows, grid_w,
        image.stride(0), image.stride(1), image.stride(2), out.stride(0),
        *(float(m) for m in mean), *(float(s) for s in std),
        P=patch_size, MERGE=merge_size, TEMPORAL=temporal_patch_size,
        BLOCK_R=block_r, BLOCK_K=triton.next_power_of_2(3 * patch_size * patch_size),
        num_warps=cfg.get("num_warps", 4),
    )
    return out
