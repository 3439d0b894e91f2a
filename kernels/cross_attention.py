"""cross_attention: non-causal attention of each query token to a row range of its request's
paged cross sequence (Mllama's image rows; the Mllama vision tower's padding mask, one block
per image).

Request i owns queries q[query_start_loc[i]:query_start_loc[i+1]] and the first seq_lens[i]
rows stored at blocks block_tables[i]. Query t attends to rows [ranges[t, 0], ranges[t, 1]);
an empty range attends to all seq_lens[i] rows (transformers' Mllama, see
`reference.cross_attention`); a request with seq_lens[i] == 0 gives zeros.

Grid: (query block, kv head), every request of the launch in one flat grid. Request i owns
the program slots [qsl[i] // BLOCK_Q + i, qsl[i+1] // BLOCK_Q + i + 1), at least
cdiv(q_len_i, BLOCK_Q) of them, so T // BLOCK_Q + R programs cover every query block; a
program finds its request by binary search over query_start_loc and exits when its slot is
past the request's queries.

GQA packing: one program serves all `group` query heads of one kv head, so each K/V tile is
loaded once per group. Tile rows r = (query qi = r // GROUP_PAD, head g = r % GROUP_PAD).
Each row keeps its own range; the program walks the union of its rows' ranges in BLOCK_N
key tiles (per-key block lookup, so BLOCK_N need not divide the cache block size) with an
online softmax (running max m, running sum l) in float32, base-2 exponentials with log2(e)
folded into the scale.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vlmserve.kernels import _interpreter as _it
from vlmserve.kernels.tuning import launch_config
from vlmserve.kernels.varlen_attention import check_attention_qkv


@triton.jit
def _cross_attention_kernel(
    q_ptr, kc_ptr, vc_ptr, o_ptr, bt_ptr, seq_lens_ptr, ranges_ptr, qsl_ptr,
    num_reqs, qk_scale, head_dim, group, block_size,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_btr, stride_btc, stride_rt, stride_rc,
    DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    slot = tl.program_id(0)
    kv_head = tl.program_id(1)

    # This slot's request: the largest i with qsl[i] // BLOCK_Q + i <= slot (strictly
    # increasing in i); -1 when the slot lies before the first request's queries.
    left = slot * 0  # int32 tensors: loop-carried types must not change (num_reqs == 1 is constexpr)
    right = left + num_reqs
    while left < right:
        mid = (left + right) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= slot:
            left = mid + 1
        else:
            right = mid
    req = left - 1
    req_c = tl.maximum(req, 0)  # in-bounds loads for the slot that exits below
    q_start = tl.load(qsl_ptr + req_c)
    q_len = tl.load(qsl_ptr + req_c + 1) - q_start
    q_blk = slot - (q_start // BLOCK_Q + req_c)
    if (req < 0) | (q_blk * BLOCK_Q >= q_len):
        return
    seq_len = tl.load(seq_lens_ptr + req_c)

    rows = tl.arange(0, BLOCK_M)
    qi = q_blk * BLOCK_Q + rows // GROUP_PAD  # query index within the request
    g = rows % GROUP_PAD
    head = kv_head * group + g
    row_ok = (qi < q_len) & (g < group)
    offs_d = tl.arange(0, BLOCK_D)  # >= head_dim, masked (D = 80 → 128)
    d_ok = offs_d < head_dim
    tok = (q_start + qi).to(tl.int64)  # [BLOCK_M] flat token row

    # [BLOCK_M] each row's key range: empty → all seq_len rows; clamped into [0, seq_len]
    # (the launcher rejects ranges outside it; a seq_len-0 request is never checked).
    r_lo = tl.load(ranges_ptr + tok * stride_rt, mask=row_ok, other=0).to(tl.int32)
    r_hi = tl.load(ranges_ptr + tok * stride_rt + stride_rc, mask=row_ok, other=0).to(tl.int32)
    empty = r_hi <= r_lo
    r_lo = tl.where(empty, 0, tl.maximum(r_lo, 0))
    r_hi = tl.where(empty, seq_len, tl.minimum(r_hi, seq_len))
    # The union of the rows' ranges (ranges of one image are contiguous in practice).
    n_lo = tl.min(tl.where(row_ok, r_lo, seq_len), axis=0)
    n_hi = tl.max(tl.where(row_ok, r_hi, 0), axis=0)

    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    # Finite initial max: a row with no key in a tile (or none at all) stays NaN-free.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = bt_ptr + req_c.to(tl.int64) * stride_btr
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # logical row positions in the request's sequence
        n_ok = offs_n < n_hi  # n_hi <= seq_len: never past the request's blocks
        phys = tl.load(bt_row + (offs_n // block_size) * stride_btc, mask=n_ok, other=0).to(tl.int64)
        slot_off = (offs_n % block_size).to(tl.int64)
        kt = tl.load(
            kc_ptr + (phys * stride_kb + slot_off * stride_ks + kv_head * stride_kh)[None, :] + offs_d[:, None],
            mask=n_ok[None, :] & d_ok[:, None], other=0.0,
        )  # [BLOCK_D, BLOCK_N], K transposed
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        valid = n_ok[None, :] & (offs_n[None, :] >= r_lo[:, None]) & (offs_n[None, :] < r_hi[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            vc_ptr + (phys * stride_vb + slot_off * stride_vs + kv_head * stride_vh)[:, None] + offs_d[None, :],
            mask=n_ok[:, None] & d_ok[None, :], other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no rows (seq_len 0): zeros
    tl.store(
        o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
    )


def _check_batch(op: str, num_tokens: int, block_tables, seq_lens, ranges, query_start_loc, block_size: int):
    """One host sync: returns (first covered token, end of covered tokens, longest query run,
    longest sequence), raising for malformed metadata or a range outside its request's rows
    (as the reference does; a seq_len-0 request's ranges are not checked)."""
    qsl = query_start_loc.long()
    lens = seq_lens.long()
    tok = torch.arange(num_tokens, device=qsl.device)
    req = torch.searchsorted(qsl[1:], tok, right=True).clamp_(max=lens.numel() - 1)  # [T]
    covered = (tok >= qsl[0]) & (tok < qsl[-1])
    tok_len = lens[req]
    lo, hi = ranges[:, 0].long(), ranges[:, 1].long()
    bad = covered & (tok_len > 0) & ((lo < 0) | (hi < lo) | (hi > tok_len))
    first_bad = torch.where(bad, tok, num_tokens).min() if num_tokens else qsl.new_tensor(0)
    q_lens = qsl.diff()
    capacity = block_tables.shape[1] * block_size
    stats = torch.stack([
        qsl[0], qsl[-1], q_lens.min(), q_lens.max(), lens.min(), lens.max(), first_bad,
    ]).tolist()
    first, end, min_q, max_q, min_len, max_len, bad_tok = stats
    if first < 0 or end > num_tokens or min_q < 0:
        raise ValueError(f"{op}: query_start_loc must be non-decreasing within [0, {num_tokens}], got "
                         f"{query_start_loc.tolist()}")
    if min_len < 0 or max_len > capacity:
        raise ValueError(f"{op}: seq_lens must lie in [0, {capacity}] (block_tables width × block size), "
                         f"got {seq_lens.tolist()}")
    if bad_tok < num_tokens:
        i = int(req[bad_tok])
        raise ValueError(f"{op}: request {i} has a range outside [0, {int(lens[i])}] "
                         f"(token {bad_tok}: {ranges[bad_tok].tolist()})")
    return first, end, max_q, max_len


def cross_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    ranges: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D]; caches [num_blocks, block_size, Hkv, D] (any strides but the last);
    block_tables int32 [R, max_blocks]; seq_lens int32 [R]; ranges int32 [T, 2];
    query_start_loc int32 [R + 1]. Returns [T, Hq, D] in q's dtype; tokens outside
    [query_start_loc[0], query_start_loc[R]) get zeros, as in the reference."""
    op = "cross_attention"
    _it.check_device(op, q, k_cache, v_cache, block_tables, seq_lens, ranges, query_start_loc)
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"{op}: expected q [T, Hq, D] and caches [num_blocks, block_size, Hkv, D], "
                         f"got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    check_attention_qkv(op, q, k_cache, v_cache)
    num_reqs = seq_lens.numel()
    n_tokens, n_heads, head_dim = q.shape
    int_types = (torch.int32, torch.int64)
    if seq_lens.dim() != 1 or seq_lens.dtype not in int_types:
        raise ValueError(f"{op}: seq_lens must be int32 [num_reqs], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_reqs or block_tables.dtype not in int_types:
        raise ValueError(f"{op}: block_tables must be int32 [{num_reqs}, max_blocks], got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if query_start_loc.shape != (num_reqs + 1,) or query_start_loc.dtype not in int_types:
        raise ValueError(f"{op}: query_start_loc must be int32 [{num_reqs + 1}], got "
                         f"{query_start_loc.dtype} {tuple(query_start_loc.shape)}")
    if ranges.shape != (n_tokens, 2) or ranges.dtype not in int_types:
        raise ValueError(f"{op}: ranges must be int32 [{n_tokens}, 2] (one [start, end) per query token), got "
                         f"{ranges.dtype} {tuple(ranges.shape)}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"{op}: out must be {tuple(q.shape)} {q.dtype} on {q.device} with a contiguous last dim")
    if num_reqs == 0 or n_tokens == 0:
        return out.zero_()
    n_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    first, end, max_q, max_len = _check_batch(op, n_tokens, block_tables, seq_lens, ranges, query_start_loc,
                                              block_size)
    out[:first].zero_()  # tokens no request owns
    out[end:].zero_()
    if max_q == 0:
        return out
    seq_lens, query_start_loc = seq_lens.contiguous(), query_start_loc.contiguous()

    cfg = launch_config(op, {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2})
    group = n_heads // n_kv_heads
    group_pad = triton.next_power_of_2(group)
    # BLOCK_Q queries × GROUP_PAD heads per tile, at least 16 rows (the GPU's smallest dot).
    block_q = min(triton.next_power_of_2(max_q), max(1, cfg["block_m"] // group_pad))
    block_q = max(block_q, triton.cdiv(16, group_pad))
    block_n = max(16, min(cfg["block_n"], triton.next_power_of_2(max(max_len, 1))))
    grid = (n_tokens // block_q + num_reqs, n_kv_heads)
    _cross_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, ranges, query_start_loc,
        num_reqs, float(scale) * math.log2(math.e), head_dim, group, block_size,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_tables.stride(0), block_tables.stride(1), ranges.stride(0), ranges.stride(1),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_Q=block_q, GROUP_PAD=group_pad, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    return out
