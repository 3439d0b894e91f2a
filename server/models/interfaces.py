"""The one interface the model runner calls. Every family implements it.

Tensors: `input_ids` int64 [T]; `positions` int64 [T] (1-D RoPE) or [3, T] (M-RoPE);
`inputs_embeds` [T, hidden]; `hidden` [T, hidden]; all on the model's device. The batch
is flattened across requests (see `server/runner/forward_batch.py`).

Inline-embedding families set `cross_kv_cache_spec = None`; for cross-attention families
(Mllama) `embed_multimodal` returns each item's `cross_attn_tokens` rows, which the runner
passes to `write_cross_kv` once per request, and `forward` reads them through
`batch.cross`.

The runner's step, for an inline-embedding family:
    embeds = model.embed_input_ids(input_ids)
    kernels.merge_embeddings(embeds, vision_rows, placeholder_positions)   # if any
    hidden = model.forward(embeds, positions, batch)
    logits = model.compute_logits(hidden[logits_indices])

`embed_multimodal` runs the vision tower on a list of items (all the images a step
needs, in one variable-length batch) and returns, per item, its rows
[item.num_embeds, hidden]; the runner keeps them in the encoder cache by content hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

import torch

from vlmserve.multimodal.inputs import MultiModalItem
from vlmserve.runner.forward_batch import ForwardBatch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int


@runtime_checkable
class VLModel(Protocol):
    kv_cache_spec: KVCacheSpec
    uses_mrope: bool
    # Cross-attention families (Mllama): the spec of the per-request cross-attention K/V
    # (num_layers = number of cross-attention layers); None for inline-embedding families.
    cross_kv_cache_spec: KVCacheSpec | None

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]: ...

    def forward(
        self, inputs_embeds: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def write_cross_kv(
        self,
        encoder_rows: torch.Tensor,
        slot_mapping: torch.Tensor,
        cross_kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Cross-attention families only: project one request's encoder rows
        [n, hidden] (its items' `embed_multimodal` outputs, concatenated in item order) to
        K/V for every cross-attention layer and write them at `slot_mapping` [n]. Called once
        per request admission, before the forward pass of its first chunk."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...
