"""RMSNorm with an optional fused residual add: y = x / rms(x) * weight.

Matches `reference.rms_norm`: with `residual`, s = x + residual is rounded to x's dtype,
returned as the next residual, and normalised; the norm is computed in float32, rounded
to x's dtype, then multiplied by weight (output dtype = promote(x, weight)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmserve.kernels import _interpreter as _it
from vlmserve.kernels.tuning import launch_config


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr,
    n_rows, n_cols, eps,
    stride_x, stride_r, stride_out, stride_sum,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program normalises BLOCK_M whole rows; BLOCK_N >= n_cols (a row fits one tile).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]  # [BLOCK_M, 1]
    cols = tl.arange(0, BLOCK_N)[None, :]  # [1, BLOCK_N]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows * stride_r + cols, mask=mask, other=0.0)
        # The sum is rounded to x's dtype, as the reference adds in that dtype.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows * stride_sum + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, axis=1) / n_cols + eps)  # [BLOCK_M]
    h = (h * inv_rms[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows * stride_out + cols, (h * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., H], weight [H], residual like x. `out` / `residual_out` (optional, for tests
    and buffer reuse) must have x's shape and the result dtypes."""
    op = "rms_norm"
    tensors = [x, weight] + ([residual] if residual is not None else [])
    _it.check_device(op, *tensors)
    _it.check_float(op, x=x, weight=weight)
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"{op}: weight must have shape ({hidden},) to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    _it.check_last_dim_contiguous(op, x=x, weight=weight)
    try:
        x2 = x.view(-1, hidden)  # [rows, H], any row stride
    except RuntimeError as e:
        raise ValueError(f"{op}: x {tuple(x.shape)} strides {x.stride()} cannot be viewed as [rows, H]") from e
    r2 = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"{op}: residual must match x ({tuple(x.shape)}, {x.dtype}), got {tuple(residual.shape)}, {residual.dtype}"
            )
        _it.check_last_dim_contiguous(op, residual=residual)
        r2 = residual.reshape(-1, hidden)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous {tuple(x.shape)} {out_dtype}, got {tuple(out.shape)} {out.dtype}")
    if residual is not None:
        if residual_out is None:
            residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        elif residual_out.shape != x.shape or residual_out.dtype != x.dtype or not residual_out.is_contiguous():
            raise ValueError(f"{op}: residual_out must be contiguous {tuple(x.shape)} {x.dtype}")
    n_rows = x2.shape[0]
    if n_rows == 0:
        return out if residual is None else (out, residual_out)
    cfg = launch_config(op, {"max_rows_per_program": 1, "num_warps": 4})
    block_n = triton.next_power_of_2(hidden)
    # Interpreter: rows per program bounded so one tile stays ~64k elements.
    block_m = max(1, min(cfg["max_rows_per_program"], 65536 // block_n, triton.next_power_of_2(n_rows)))
    out2 = out.view(-1, hidden)
    sum2 = residual_out.view(-1, hidden) if residual is not None else out2
    grid = (triton.cdiv(n_rows, block_m),)
    _rms_norm_kernel[grid](
        x2, r2 if r2 is not None else x2, weight, out2, sum2,
        n_rows, hidden, float(eps),
        x2.stride(0), r2.stride(0) if r2 is not None else 0, out2.stride(0), sum2.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=cfg.get("num_warps", 4),
    )
    return out if residual is None else (out, residual_out)
