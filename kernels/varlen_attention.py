"""varlen_attention: flash-style attention within each sequence of a concatenated batch.

Sequence i is rows [cu_seqlens[i], cu_seqlens[i+1]) of q [T, Hq, D] and k, v [T, Hkv, D];
queries attend only to keys of their own sequence (block-diagonal: one image = one block),
optionally causally. Every sequence of a launch shares one grid
(query block, sequence, query head); blocks past a sequence's end exit at once.
Online softmax (running max m, running sum l) in float32, base-2 exponentials with
log2(e) folded into the scale.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vlmserve.kernels import _interpreter as _it
from vlmserve.kernels.tuning import launch_config


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr,
    qk_scale, head_dim, group,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    m_blk = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_ptr + seq + 1) - start).to(tl.int32)
    if m_blk * BLOCK_M >= seq_len:
        return
    kv_head = head // group  # GQA: `group` query heads share one kv head

    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence
    offs_d = tl.arange(0, BLOCK_D)  # BLOCK_D >= head_dim, masked (D = 80 → 128)
    d_ok = offs_d < head_dim
    m_ok = offs_m < seq_len
    q = tl.load(
        q_ptr + (start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    # Finite initial max: a fully masked tile then gives exp2(-inf - m) = 0, never NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(seq_len, (m_blk + 1) * BLOCK_M)  # keys past the block's last query are all masked
    else:
        hi = seq_len
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        kt = tl.load(
            k_ptr + (start + offs_n[None, :]) * stride_kt + kv_head * stride_kh + offs_d[:, None],
            mask=n_ok[None, :] & d_ok[:, None], other=0.0,
        )  # [BLOCK_D, BLOCK_N], K transposed
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + (start + offs_n[:, None]) * stride_vt + kv_head * stride_vh + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        o_ptr + (start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
    )


def check_attention_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shared by the attention launchers: q [*, Hq, D], k/v [*, Hkv, D] (or caches), one dtype."""
    _it.check_float(op, q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    hq, d = q.shape[-2:]
    hkv = k.shape[-2]
    if k.shape != v.shape or k.shape[-1] != d:
        raise ValueError(f"{op}: k and v must have equal shapes ending in head_dim {d}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of kv heads ({hkv})")
    _it.check_last_dim_contiguous(op, q=q, k=k, v=v)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32/int64 [num_seqs + 1] (starts at 0,
    non-decreasing, ends at T), max_seqlen >= every sequence length. Returns [T, Hq, D]."""
    op = "varlen_attention"
    _it.check_device(op, q, k, v, cu_seqlens)
    if q.dim() != 3 or k.dim() != 3 or k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: expected q [T, Hq, D] and k, v [T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    check_attention_qkv(op, q, k, v)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: cu_seqlens must be int32 [num_seqs + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    n_tokens, n_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"{op}: out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    num_seqs = cu_seqlens.numel() - 1
    if n_tokens == 0 or max_seqlen <= 0:
        return out
    cu_seqlens = cu_seqlens.contiguous()
    cfg = launch_config(op, {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2})
    # Tiles no larger than the longest sequence (16 at least: the GPU's smallest dot).
    block_m = max(16, min(cfg["block_m"], triton.next_power_of_2(max_seqlen)))
    block_n = max(16, min(cfg["block_n"], triton.next_power_of_2(max_seqlen)))
    grid = (triton.cdiv(max_seqlen, block_m), num_seqs, n_heads)
    _varlen_attention_kernel[grid](
        q, k, v, out, cu_seqlens,
        float(scale) * math.log2(math.e), head_dim, n_heads // k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        CAUSAL=bool(causal), DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return out
