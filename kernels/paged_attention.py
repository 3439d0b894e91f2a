"""paged_attention: the queries of one step (prefill chunks and decodes mixed) against the
paged KV cache.

Request i owns queries q[query_start_loc[i]:query_start_loc[i+1]], the LAST q_len tokens of
its context of seq_lens[i] tokens, whose K/V are all in the cache at blocks
block_tables[i]. Query j of the request (absolute position ctx + j, ctx = seq_len - q_len)
sees keys 0..ctx + j.

GQA packing: one program serves all `group` query heads of one kv head, so each K/V tile is
loaded once per group. Tile rows r = (query qi = r // GROUP_PAD, head g = r % GROUP_PAD).
Grid: (query block, request, kv head * split). Split-K (long contexts, few programs): each
split covers a contiguous range of keys and writes an unnormalised float32 partial (acc, m,
l); `_paged_attention_reduce_kernel` merges the splits by their log-sum-exp.
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
def _paged_attention_kernel(
    q_ptr, kc_ptr, vc_ptr, o_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
    po_ptr, pm_ptr, n_tokens,
    qk_scale, head_dim, group, block_size,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    q_blk = tl.program_id(0)
    req = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    if q_blk * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx = seq_len - q_len  # tokens before this step's first query

    rows = tl.arange(0, BLOCK_M)
    qi = q_blk * BLOCK_Q + rows // GROUP_PAD  # query index within the request
    g = rows % GROUP_PAD
    head = kv_head * group + g
    row_ok = (qi < q_len) & (g < group)
    offs_d = tl.arange(0, BLOCK_D)  # >= head_dim, masked
    d_ok = offs_d < head_dim
    tok = (q_start + qi).to(tl.int64)  # [BLOCK_M] flat token row
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    # Keys this query block can see: [0, kv_hi); a split takes a BLOCK_N-aligned share.
    kv_hi = tl.minimum(seq_len, ctx + (q_blk + 1) * BLOCK_Q)
    if NUM_SPLITS == 1:
        lo = 0
        hi = kv_hi
    else:
        chunk = tl.cdiv(tl.cdiv(kv_hi, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(kv_hi, lo + chunk)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: empty splits stay NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # logical key positions
        n_ok = offs_n < hi
        # Per-key block lookup, so BLOCK_N need not equal the cache block size.
        phys = tl.load(bt_row + offs_n // block_size, mask=n_ok, other=0).to(tl.int64)
        slot_off = (offs_n % block_size).to(tl.int64)
        kt = tl.load(
            kc_ptr + (phys * stride_kb + slot_off * stride_ks + kv_head * stride_kh)[None, :] + offs_d[:, None],
            mask=n_ok[None, :] & d_ok[:, None], other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # log2 units
        valid = n_ok[None, :] & (offs_n[None, :] <= (ctx + qi)[:, None])
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

    out_mask = row_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials [NUM_SPLITS, T, Hq, *], contiguous: acc [.., BLOCK_D] and (m, l) [.., 2].
        n_heads = tl.num_programs(2) // NUM_SPLITS * group
        row = (split * n_tokens + tok) * n_heads + head  # [BLOCK_M]
        tl.store(po_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=out_mask)
        tl.store(pm_ptr + row * 2, m_i, mask=row_ok)
        tl.store(pm_ptr + row * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _paged_attention_reduce_kernel(
    po_ptr, pm_ptr, o_ptr, n_tokens, n_heads, head_dim, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (token, head): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = s < NUM_SPLITS
    row = (s * n_tokens + tok) * n_heads + head  # [BLOCK_S]
    m = tl.load(pm_ptr + row * 2, mask=s_ok, other=-1.0e30)
    l = tl.load(pm_ptr + row * 2 + 1, mask=s_ok, other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # empty splits have l = 0, acc = 0
    acc = tl.load(po_ptr + row[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.maximum(tl.sum(l * w, axis=0), 1e-30)
    tl.store(o_ptr + tok * stride_ot + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < head_dim)


def choose_num_splits(num_reqs: int, num_kv_heads: int, q_blocks: int, max_seq_len: int, cfg: dict) -> int:
    """Split the keys only when the context is long and the grid too small to fill the GPU:
    aim for ~`target_programs` programs, each keeping >= `min_keys_per_split` keys."""
    if max_seq_len < cfg["split_min_seq_len"]:
        return 1
    programs = num_reqs * num_kv_heads * q_blocks
    want = triton.cdiv(cfg["target_programs"], max(programs, 1))
    most = max(1, max_seq_len // cfg["min_keys_per_split"])
    return int(max(1, min(want, most, cfg["max_splits"])))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D]; caches [num_blocks, block_size, Hkv, D]; block_tables int32 [R, max_blocks];
    seq_lens int32 [R]; query_start_loc int32 [R + 1]; max_query_len / max_seq_len bound every
    request's q_len / seq_len. `num_splits` overrides the split-K heuristic. Returns [T, Hq, D]."""
    op = "paged_attention"
    _it.check_device(op, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"{op}: expected q [T, Hq, D] and caches [num_blocks, block_size, Hkv, D], "
                         f"got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    check_attention_qkv(op, q, k_cache, v_cache)
    num_reqs = seq_lens.numel()
    int_types = (torch.int32, torch.int64)
    if block_tables.dim() != 2 or block_tables.shape[0] != num_reqs or block_tables.dtype not in int_types:
        raise ValueError(f"{op}: block_tables must be int32 [{num_reqs}, max_blocks], got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if query_start_loc.shape != (num_reqs + 1,) or query_start_loc.dtype not in int_types or seq_lens.dtype not in int_types:
        raise ValueError(f"{op}: query_start_loc must be int32 [{num_reqs + 1}] and seq_lens int32 [{num_reqs}], got "
                         f"{query_start_loc.dtype} {tuple(query_start_loc.shape)} and {seq_lens.dtype}")
    if block_tables.stride(1) != 1:
        raise ValueError(f"{op}: block_tables must be contiguous along its blocks, got strides {block_tables.stride()}")
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"{op}: k_cache and v_cache must share strides, got {k_cache.stride()} and {v_cache.stride()}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"{op}: out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim")
    if n_tokens == 0 or num_reqs == 0 or max_query_len <= 0:
        return out
    seq_lens, query_start_loc = seq_lens.contiguous(), query_start_loc.contiguous()

    cfg = launch_config(op, {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 2,
                             "split_min_seq_len": 2048, "target_programs": 264,
                             "min_keys_per_split": 256, "max_splits": 16})
    group = n_heads // n_kv_heads
    group_pad = triton.next_power_of_2(group)
    # BLOCK_Q queries × GROUP_PAD heads per tile, at least 16 rows (the GPU's smallest dot).
    block_q = min(triton.next_power_of_2(max_query_len), max(1, cfg["block_m"] // group_pad))
    block_q = max(block_q, triton.cdiv(16, group_pad))
    block_n = max(16, min(cfg["block_n"], triton.next_power_of_2(max(max_seq_len, 1))))
    block_d = max(16, triton.next_power_of_2(head_dim))
    q_blocks = triton.cdiv(max_query_len, block_q)
    if num_splits is None:
        num_splits = choose_num_splits(num_reqs, n_kv_heads, q_blocks, max_seq_len, cfg)
    if num_splits < 1:
        raise ValueError(f"{op}: num_splits must be >= 1, got {num_splits}")
    if num_splits > 1:
        partial_o = torch.empty((num_splits, n_tokens, n_heads, block_d), dtype=torch.float32, device=q.device)
        partial_ml = torch.empty((num_splits, n_tokens, n_heads, 2), dtype=torch.float32, device=q.device)
    else:
        partial_o = partial_ml = out  # unused
    grid = (q_blocks, num_reqs, n_kv_heads * num_splits)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        partial_o, partial_ml, n_tokens,
        float(scale) * math.log2(math.e), head_dim, group, block_size,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0),
        NUM_SPLITS=num_splits, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_Q=block_q, GROUP_PAD=group_pad, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2),
    )
    if num_splits > 1:
        _paged_attention_reduce_kernel[(n_tokens, n_heads)](
            partial_o, partial_ml, out, n_tokens, n_heads, head_dim, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out
