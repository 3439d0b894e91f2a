"""Attention over the paged KV cache (decoder) and over concatenated images (vision).

Both go through `kernels`, so the Triton kernels replace the references with no change here.
"""

from __future__ import annotations

import torch
from torch import nn

from vlmserve import kernels
from vlmserve.runner.forward_batch import ForwardBatch


class PagedAttention(nn.Module):
    """Causal self-attention of one decoder layer against its paged KV cache.

    Takes q [T, Hq, D] and k, v [T, Hkv, D] of a flattened step (rotary already applied),
    writes k/v into `batch.kv_caches[layer_idx]` at `batch.slot_mapping`, then attends every
    query to its request's whole context. Returns [T, Hq, D]."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if self.layer_idx >= len(batch.kv_caches):
            raise ValueError(
                f"ForwardBatch has {len(batch.kv_caches)} KV caches but layer {self.layer_idx} needs one; "
                "allocate one (k_cache, v_cache) pair per decoder layer (see model.kv_cache_spec)"
            )
        k_cache, v_cache = batch.kv_caches[self.layer_idx]
        kernels.write_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        return kernels.paged_attention(
            q,
            k_cache,
            v_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            batch.max_query_len,
            batch.max_seq_len,
            self.scale,
            batch.attn_plan,
        )


def vision_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """Bidirectional attention confined to each segment [cu_seqlens[i], cu_seqlens[i+1]) of
    the concatenated patches (one segment per image or video frame). q, k, v [N, H, D] →
    [N, H, D]. cu_seqlens int32 [num_segments + 1], on q's device."""
    return kernels.varlen_attention(q, k, v, cu_seqlens, max_seqlen, False, scale)


def segment_cu_seqlens(lengths: list[int], device: torch.device | str) -> tuple[torch.Tensor, int]:
    """Segment lengths → (cu_seqlens int32 [len + 1] on `device`, max length)."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device), max(lengths, default=0)
