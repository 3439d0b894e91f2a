"""write_kv: scatter the step's new K/V rows into the paged caches at their slots
(slot = block_id * block_size + offset), both caches in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmserve.kernels import _interpreter as _it
from vlmserve.kernels.tuning import launch_config


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    n_tokens, n_heads, head_dim, block_size, n_slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Tile [BLOCK_T tokens, BLOCK_H kv heads (all), BLOCK_D (>= head_dim)].
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    slot = tl.load(slot_ptr + tok, mask=tok < n_tokens, other=-1).to(tl.int64)
    # Slots outside the cache (e.g. -1 padding) are skipped: an out-of-bounds store would
    # corrupt memory on the GPU and crash the interpreter.
    tok_ok = (tok < n_tokens) & (slot >= 0) & (slot < n_slots)
    mask = tok_ok[:, None, None] & (h < n_heads) & (d < head_dim)
    blk = (slot // block_size)[:, None, None]
    off = (slot % block_size)[:, None, None]
    t = tok[:, None, None].to(tl.int64)
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask, other=0.0)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
    tl.store(kc_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d, v.to(vc_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hk, D]; k_cache, v_cache [num_blocks, block_size, Hk, D]; slot_mapping [T]
    int64/int32 flat slots. Slots outside [0, num_blocks * block_size) are skipped."""
    op = "write_kv"
    _it.check_device(op, k, v, k_cache, v_cache, slot_mapping)
    _it.check_float(op, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"{op}: k and v must both be [T, Hk, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != tuple(k.shape[1:]):
        raise ValueError(
            f"{op}: caches must both be [num_blocks, block_size, {k.shape[1]}, {k.shape[2]}], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: slot_mapping must be int64 [{k.shape[0]}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    _it.check_last_dim_contiguous(op, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    n_tokens, n_heads, head_dim = k.shape
    if n_tokens == 0:
        return
    num_blocks, block_size = k_cache.shape[:2]
    slot_mapping = slot_mapping.contiguous()
    cfg = launch_config(op, {"block_tokens": 4, "num_warps": 4})
    block_t = max(1, min(cfg["block_tokens"], triton.next_power_of_2(n_tokens)))
    grid = (triton.cdiv(n_tokens, block_t),)
    _write_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping,
        n_tokens, n_heads, head_dim, block_size, num_blocks * block_size,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        BLOCK_T=block_t, BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=cfg.get("num_warps", 4),
    )
