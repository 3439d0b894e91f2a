"""silu_and_mul: x [..., 2 * I] → silu(x[..., :I]) * x[..., I:], the gated MLP activation."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmserve.kernels import _interpreter as _it
from vlmserve.kernels.tuning import launch_config


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, n_rows, inter,
    stride_x, stride_out,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (i, j) covers rows [i*BLOCK_M, ...) and output columns [j*BLOCK_N, ...).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < n_rows) & (cols < inter)
    gate = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + rows * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # silu is rounded to the input dtype before the product, as the reference's F.silu is.
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + rows * stride_out + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2 * I] → [..., I]. `out` (optional) must be contiguous [..., I] of x's dtype."""
    op = "silu_and_mul"
    _it.check_device(op, x)
    _it.check_float(op, x=x)
    if x.shape[-1] % 2:
        raise ValueError(f"{op}: the last dim of x must be even (gate and up halves), got {tuple(x.shape)}")
    _it.check_last_dim_contiguous(op, x=x)
    inter = x.shape[-1] // 2
    try:
        x2 = x.view(-1, 2 * inter)  # [rows, 2I], any row stride
    except RuntimeError as e:
        raise ValueError(f"{op}: x {tuple(x.shape)} strides {x.stride()} cannot be viewed as [rows, 2I]") from e
    out_shape = (*x.shape[:-1], inter)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != out_shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous {out_shape} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    n_rows = x2.shape[0]
    if n_rows == 0 or inter == 0:
        return out
    cfg = launch_config(op, {"block_rows": 4, "block_cols": 1024, "num_warps": 4})
    block_n = min(cfg["block_cols"], triton.next_power_of_2(inter))
    block_m = max(1, min(cfg["block_rows"], triton.next_power_of_2(n_rows)))
    out2 = out.view(-1, inter)
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(inter, block_n))
    _silu_and_mul_kernel[grid](
        x2, out2, n_rows, inter, x2.stride(0), out2.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=cfg.get("num_warps", 4),
    )
    return out
