"""resize_patchify: uint8 pixels on the device → an antialiased span resize (TensorFlow's
`ScaleAndTranslate` form), clipped, placed on a zero canvas, normalised, cut into crops of
patch rows (Molmo's `images` layout), in one pass. The host ships the decoded uint8 image and
a few KB of span tables (`reference.resize_patchify` documents the arithmetic).

One program computes a tile of [BLOCK_R output rows (crop patches), BLOCK_K >= P*P*3 columns
(patch row, patch col, channel)]. Each element maps to a canvas pixel; inside the resized image
it is sum_j x_weight[j] * (sum_i y_weight[i] * level(pixel[y0 + i, x0 + j])), the rows pass
then the columns pass of the reference, in the same tap order; outside it is 0 (padding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmserve.kernels import _interpreter as _it
from vlmserve.kernels.reference import check_resize_patchify_args
from vlmserve.kernels.tuning import launch_config


@triton.jit
def _resize_patchify_kernel(
    px_ptr, levels_ptr, ys_ptr, yw_ptr, xs_ptr, xw_ptr, mean_ptr, std_ptr, origins_ptr, out_ptr,
    n_rows, in_h, in_w, out_h, out_w, top, left, span_y, span_x,
    stride_h, stride_w, stride_c, stride_out,
    P: tl.constexpr, NW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_K)
    row_ok = r < n_rows
    crop = r // (NW * NW)
    patch = r % (NW * NW)
    dh = k // (P * 3)
    dw = (k // 3) % P
    c = k % 3
    col_ok = k < P * P * 3
    oy0 = tl.load(origins_ptr + crop * 2, mask=row_ok, other=0)
    ox0 = tl.load(origins_ptr + crop * 2 + 1, mask=row_ok, other=0)
    # Resized-image coordinates of each element: [BLOCK_R, BLOCK_K].
    ry = (oy0 + (patch // NW) * P - top)[:, None] + dh[None, :]
    rx = (ox0 + (patch % NW) * P - left)[:, None] + dw[None, :]
    inside = row_ok[:, None] & col_ok[None, :] & (ry >= 0) & (ry < out_h) & (rx >= 0) & (rx < out_w)
    ry = tl.where(inside, ry, 0)
    rx = tl.where(inside, rx, 0)
    y0 = tl.load(ys_ptr + ry, mask=inside, other=0)
    x0 = tl.load(xs_ptr + rx, mask=inside, other=0)
    chan = (c * stride_c)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for j in range(0, span_x):
        wx = tl.load(xw_ptr + rx * span_x + j, mask=inside, other=0.0)
        xi = tl.minimum(x0 + j, in_w - 1)
        inner = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for i in range(0, span_y):
            wy = tl.load(yw_ptr + ry * span_y + i, mask=inside, other=0.0)
            yi = tl.minimum(y0 + i, in_h - 1)
            pix = tl.load(px_ptr + yi.to(tl.int64) * stride_h + xi * stride_w + chan, mask=inside, other=0)
            inner += wy * tl.load(levels_ptr + pix.to(tl.int32), mask=inside, other=0.0)
        acc += wx * inner
    acc = tl.minimum(tl.maximum(acc, 0.0), 1.0)
    acc = tl.where(inside, acc, 0.0)
    mean = tl.load(mean_ptr + c, mask=col_ok, other=0.0)
    std = tl.load(std_ptr + c, mask=col_ok, other=1.0)
    val = tl.math.div_rn(acc - mean[None, :], tl.broadcast_to(std[None, :], (BLOCK_R, BLOCK_K)))
    dst = out_ptr + r.to(tl.int64)[:, None] * stride_out + k[None, :]
    tl.store(dst, val, mask=row_ok[:, None] & col_ok[None, :])


def resize_patchify(
    pixels: torch.Tensor,
    levels: torch.Tensor,
    y_starts: torch.Tensor,
    y_weights: torch.Tensor,
    x_starts: torch.Tensor,
    x_weights: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    origins: torch.Tensor,
    place: tuple[int, int],
    crop_size: int,
    patch_size: int,
) -> torch.Tensor:
    """Same contract as `reference.resize_patchify`: float32 [n_crops, (crop/P)², P * P * 3]."""
    op = "resize_patchify"
    _it.check_device(op, pixels)
    check_resize_patchify_args(pixels, levels, y_starts, y_weights, x_starts, x_weights, mean, std, origins,
                               place, crop_size, patch_size)
    nw = crop_size // patch_size
    n_rows, n_cols = origins.shape[0] * nw * nw, patch_size * patch_size * 3
    out = torch.empty((origins.shape[0], nw * nw, n_cols), dtype=torch.float32, device=pixels.device)
    cfg = launch_config(op, {"block_rows": 4, "num_warps": 4})
    block_r = max(1, min(cfg["block_rows"], triton.next_power_of_2(n_rows)))
    grid = (triton.cdiv(n_rows, block_r),)
    stride_h, stride_w, stride_c = pixels.stride()
    _resize_patchify_kernel[grid](
        pixels, levels, y_starts, y_weights, x_starts, x_weights, mean, std, origins, out,
        n_rows, pixels.shape[0], pixels.shape[1], y_starts.numel(), x_starts.numel(), int(place[0]), int(place[1]),
        y_weights.shape[1], x_weights.shape[1], stride_h, stride_w, stride_c, n_cols,
        P=patch_size, NW=nw, BLOCK_R=block_r, BLOCK_K=triton.next_power_of_2(n_cols),
        num_warps=cfg.get("num_warps", 4),
    )
    return out
