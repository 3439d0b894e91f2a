"""merge_embeddings: write vision embeddings into the token embeddings at the rows of their
placeholder tokens, in place (inputs_embeds[positions] = mm_embeds)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmserve.kernels import _interpreter as _it
from vlmserve.kernels.tuning import launch_config


@triton.jit
def _merge_embeddings_kernel(
    dst_ptr, src_ptr, pos_ptr, n_src, n_dst, hidden,
    stride_dst, stride_src,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Program (i, j): source rows [i*BLOCK_M, ...), columns [j*BLOCK_H, ...).
    src_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
    row_ok = src_rows < n_src
    dst_rows = tl.load(pos_ptr + src_rows, mask=row_ok, other=0).to(tl.int64)
    # A position outside [0, n_dst) is skipped rather than written out of bounds.
    row_ok = row_ok & (dst_rows >= 0) & (dst_rows < n_dst)
    mask = row_ok[:, None] & (cols < hidden)
    vals = tl.load(src_ptr + src_rows[:, None].to(tl.int64) * stride_src + cols, mask=mask, other=0.0)
    tl.store(dst_ptr + dst_rows[:, None] * stride_dst + cols, vals.to(dst_ptr.dtype.element_ty), mask=mask)


def merge_embeddings(inputs_embeds: torch.Tensor, mm_embeds: torch.Tensor, positions: torch.Tensor) -> None:
    """inputs_embeds [T, H] gets mm_embeds [M, H] at rows positions [M] (int32/int64), in
    place. Positions must be distinct (duplicates write in an unspecified order)."""
    op = "merge_embeddings"
    _it.check_device(op, inputs_embeds, mm_embeds, positions)
    _it.check_float(op, inputs_embeds=inputs_embeds, mm_embeds=mm_embeds)
    if inputs_embeds.dim() != 2 or mm_embeds.dim() != 2 or inputs_embeds.shape[1] != mm_embeds.shape[1]:
        raise ValueError(
            f"{op}: expected inputs_embeds [T, H] and mm_embeds [M, H], got "
            f"{tuple(inputs_embeds.shape)} and {tuple(mm_embeds.shape)}"
        )
    if positions.shape != (mm_embeds.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{op}: positions must be int32/int64 [{mm_embeds.shape[0]}], got {positions.dtype} {tuple(positions.shape)}"
        )
    _it.check_last_dim_contiguous(op, inputs_embeds=inputs_embeds, mm_embeds=mm_embeds)
    n_src, hidden = mm_embeds.shape
    if n_src == 0:
        return
    positions = positions.contiguous()
    cfg = launch_config(op, {"block_rows": 4, "block_cols": 1024, "num_warps": 4})
    block_h = min(cfg["block_cols"], triton.next_power_of_2(hidden))
    block_m = max(1, min(cfg["block_rows"], triton.next_power_of_2(n_src)))
    grid = (triton.cdiv(n_src, block_m), triton.cdiv(hidden, block_h))
    _merge_embeddings_kernel[grid](
        inputs_embeds, mm_embeds, positions, n_src, inputs_embeds.shape[0], hidden,
        inputs_embeds.stride(0), mm_embeds.stride(0),
        BLOCK_M=block_m, BLOCK_H=block_h, num_warps=cfg.get("num_warps", 4),
    )
