"""rotary: rotate-half RoPE applied in place to q [T, Hq, D] and k [T, Hk, D] with per-token
cos/sin [T, D/2]. 1-D RoPE, M-RoPE (3 sections) and 2-D RoPE differ only in how cos/sin
are built upstream, so this one kernel serves all of them."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmserve.kernels import _interpreter as _it
from vlmserve.kernels.tuning import launch_config


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, n_tokens, n_heads, half,
    stride_xt, stride_xh, stride_ct, stride_st,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # Tile [BLOCK_T tokens, BLOCK_H heads (all), BLOCK_HALF (>= D/2, masked: D=80 → 40)].
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None, None]
    h = tl.arange(0, BLOCK_H)[None, :, None]
    j = tl.arange(0, BLOCK_HALF)[None, None, :]
    tok_ok = tok < n_tokens
    cs_mask = tok_ok & (j < half)  # [BLOCK_T, 1, BLOCK_HALF]: cos/sin shared by all heads
    c = tl.load(cos_ptr + tok * stride_ct + j, mask=cs_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + tok * stride_st + j, mask=cs_mask, other=0.0).to(tl.float32)
    mask = cs_mask & (h < n_heads)
    p1 = x_ptr + tok.to(tl.int64) * stride_xt + h * stride_xh + j  # first half; pairs with p1 + half
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + half, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)


def _check_rotated(op: str, name: str, x: torch.Tensor, n_tokens: int, head_dim: int) -> None:
    if x.dim() != 3 or x.shape[0] != n_tokens or x.shape[2] != head_dim:
        raise ValueError(f"{op}: {name} must be [{n_tokens}, H, {head_dim}], got {tuple(x.shape)}")


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """q [T, Hq, D] and k [T, Hk, D] rotated in place (they may be strided views of a fused
    qkv buffer, last dim contiguous); cos, sin [T, D/2] float32 or q's dtype."""
    op = "rotary"
    _it.check_device(op, q, k, cos, sin)
    _it.check_float(op, q=q, k=k, cos=cos, sin=sin)
    if q.dim() != 3 or q.shape[2] % 2:
        raise ValueError(f"{op}: q must be [T, Hq, D] with an even D, got {tuple(q.shape)}")
    n_tokens, _, head_dim = q.shape
    _check_rotated(op, "k", k, n_tokens, head_dim)
    half = head_dim // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (n_tokens, half):
            raise ValueError(f"{op}: {name} must be [T, D/2] = [{n_tokens}, {half}], got {tuple(t.shape)}")
    _it.check_last_dim_contiguous(op, q=q, k=k, cos=cos, sin=sin)
    if n_tokens == 0:
        return
    cfg = launch_config(op, {"block_tokens": 4, "num_warps": 4})
    block_t = max(1, min(cfg["block_tokens"], triton.next_power_of_2(n_tokens)))
    grid = (triton.cdiv(n_tokens, block_t),)
    for x in (q, k):
        _rotary_kernel[grid](
            x, cos, sin, n_tokens, x.shape[1], half,
            x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
            BLOCK_T=block_t, BLOCK_H=triton.next_power_of_2(x.shape[1]), BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=cfg.get("num_warps", 4),
        )
