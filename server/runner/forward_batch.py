"""ForwardBatch: the attention metadata of one step, passed explicitly to the model.

Chain: `SchedulerOutput` (engine, plain Python) → `input_batch.build_inputs` (pure, numpy)
→ `ForwardBatch` (torch, on the model's device) → `Model.forward`.

The batch is flattened: the step's tokens of every request are concatenated, request by
request, with no padding. Request i owns tokens `[query_start_loc[i], query_start_loc[i+1])`,
which are the last `query_len_i` tokens of a context of `seq_lens[i]` tokens; its K/V for
all of them lives in the paged cache after `write_kv`, at the blocks `block_tables[i]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlmserve.kernels.reference import PagedAttentionPlan


@dataclass
class ForwardBatch:
    num_reqs: int
    num_tokens: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1], device
    seq_lens: torch.Tensor  # int32 [num_reqs], device: context length after this step
    block_tables: torch.Tensor  # int32 [num_reqs, max_blocks_per_req], device; unused slots = 0
    slot_mapping: torch.Tensor  # int64 [num_tokens], device: block_id * block_size + offset
    max_query_len: int
    max_seq_len: int
    # Per decoder layer: (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim].
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # Host copies of query_start_loc / seq_lens, so reference kernels need no device sync.
    query_start_loc_cpu: list[int] = field(default_factory=list)
    seq_lens_cpu: list[int] = field(default_factory=list)
    # The step-wide gather indices and masks of the reference paged attention, built once per
    # step (`kernels.plan_paged_attention`) for all layers; None on the Triton path.
    attn_plan: "PagedAttentionPlan | None" = None
    # Cross-attention (Mllama). None for inline-embedding families and for a batch where no
    # request has images. Request i's cross K/V (all its images' rows, in item order) lives
    # in `cross_kv_caches[j]` (one pair per cross-attention layer, same block layout as the
    # self-attention cache) at the blocks `cross_block_tables[i]`; `cross_seq_lens[i]` rows
    # (0: a text-only request, whose cross-attention layers are skipped).
    cross: "CrossAttentionBatch | None" = None


@dataclass
class CrossAttentionBatch:
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per cross layer, [blocks, block_size, Hkv, D]
    block_tables: torch.Tensor  # int32 [num_reqs, max_cross_blocks], device
    seq_lens: torch.Tensor  # int32 [num_reqs], device
    # int32 [num_tokens, 2], device: the [start, end) rows of its request's cross sequence each
    # query token attends to (start == end: it attends to no image).
    ranges: torch.Tensor
    seq_lens_cpu: list[int] = field(default_factory=list)
