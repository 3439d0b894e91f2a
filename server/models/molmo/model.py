"""Molmo v1 (`MolmoForCausalLM`, Molmo-7B-D-0924 / Molmo-72B-0924): the vision backbone
(`vision.py`) plus its OLMo-style Qwen2 decoder over the paged KV cache, implementing
`server/models/interfaces.py::VLModel`.

Decoder block (norm_after false): RMSNorm `attn_norm` → fused q|k|v `att_proj` (with bias),
rotate-half RoPE, GQA, `attn_out` (no bias) → residual → RMSNorm `ff_norm` → `ff_proj` [2I', H]
whose first half is the *value* and second half the *gate* (`silu(gate) * value`) → `ff_out`.
Here it is the shared `TextDecoder`: at load, ff_proj's halves are swapped into gate_up_proj's
(gate, up) order and wte.embedding | wte.new_embedding fill one embedding table.

Image features are *added* to the `<im_patch>` token embeddings (the official
`x[image_input_idx] += features`): `embed_multimodal` returns embedding(<im_patch>) + feature
for each `<im_patch>` position, which the runner then writes over those positions.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.models.interfaces import KVCacheSpec
from vlmserve.models.layers.decoder import TextDecoder
from vlmserve.models.layers.rotary import rope_cos_sin, rope_inv_freq
from vlmserve.models.layers.weights import IGNORED_SUFFIXES, WeightLoadTracker
from vlmserve.models.molmo.config import ADDITIONAL_VOCAB_SIZE, MolmoModelConfig
from vlmserve.models.molmo.image_processor import crops_from_plan, writable
from vlmserve.models.molmo.vision import MolmoVisionBackbone
from vlmserve.multimodal.inputs import MultiModalItem
from vlmserve.runner.forward_batch import ForwardBatch

Device = torch.device | str


class MolmoForCausalLM(nn.Module):
    """Parameters are allocated uninitialised: `load_weights` must run before use."""

    uses_mrope = False
    cross_kv_cache_spec = None

    def __init__(self, config: MolmoModelConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.config = config
        c = config
        self.kv_cache_spec = KVCacheSpec(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        meta = torch.device("meta")
        self.vision_backbone = MolmoVisionBackbone(c, dtype, meta)
        self.language_model = TextDecoder(
            c.total_embeddings, c.hidden_size, c.mlp_hidden, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.layer_norm_eps, qkv_bias=c.qkv_bias, dtype=dtype, device=meta,
        )
        self.lm_head = nn.Linear(c.hidden_size, c.embedding_size, bias=False, dtype=dtype, device=meta)
        self.to_empty(device=device)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # --- VLModel -------------------------------------------------------------------------

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """All crops of all items in one vision batch; item i gets one row per `<im_patch>` of
        its range, in prompt order: embedding(<im_patch>) + its pooled, projected feature."""
        if not items:
            return []
        dev, dtype = self.device, self.lm_head.weight.dtype
        crops, masks = [], []
        for item in items:
            data = item.data
            missing = {"pixels", "plan", "processor", "patch_token_id"} - set(data)
            if missing:
                raise ValueError(f"image item {item.content_hash[:16]}: data lacks {sorted(missing)} (the Molmo "
                                 "processor's output)")
            pixels = torch.from_numpy(writable(data["pixels"])).to(dev, non_blocking=True)
            crops.append(crops_from_plan(pixels, data["plan"], data["processor"]))
            masks.append(torch.from_numpy(writable(data["plan"]["image_masks"])).to(dev))
        counts = [c.shape[0] for c in crops]
        features = self.vision_backbone(torch.cat(crops).to(dtype), torch.cat(masks))  # [sum n, 144, H]
        out = []
        for item, feats in zip(items, features.split(counts)):
            rows_of = torch.from_numpy(writable(item.data["plan"]["feature_rows"])).to(dev).long()  # [n, 144]
            valid = rows_of >= 0
            if int(valid.sum()) != item.num_embeds:
                raise ValueError(f"image item {item.content_hash[:16]}: {int(valid.sum())} features for "
                                 f"{item.num_embeds} <im_patch> positions")
            patch = self.language_model.embed_tokens.weight[int(item.data["patch_token_id"])]
            rows = torch.empty((item.num_embeds, feats.shape[-1]), dtype=feats.dtype, device=dev)
            rows[rows_of[valid]] = patch + feats[valid]
            out.append(rows)
        return out

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """inputs_embeds [T, hidden]; positions int64 [T] → ln_f-normed hidden [T, hidden]."""
        if positions.dim() != 1:
            raise ValueError(f"Molmo takes 1-D positions [T], got shape {tuple(positions.shape)}")
        c = self.config
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, device=inputs_embeds.device)
        cos, sin = rope_cos_sin(positions, inv_freq)
        return self.language_model(inputs_embeds, cos, sin, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, embedding_size] float32: the new_embedding rows (image tokens) are never logits."""
        return F.linear(hidden, self.lm_head.weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The published names (`model.transformer.*`, `model.vision_backbone.*`); raises naming
        every missing or unexpected tensor."""
        c = self.config
        tracker = WeightLoadTracker(self)
        tracker.declare_fused(
            "language_model.embed_tokens.weight", [("embedding", c.embedding_size), ("new_embedding", ADDITIONAL_VOCAB_SIZE)]
        )
        for name, tensor in weights:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            param, shard = _param_for(name)
            if param.endswith(".mlp.gate_up_proj.weight") and tensor.dim() == 2 and tensor.shape[0] % 2 == 0:
                value, gate = tensor.chunk(2, dim=0)  # official SwiGLU: x, gate = chunk(2)
                tensor = torch.cat([gate, value])
            tracker.copy(param, tensor, name, shard)
        tracker.check_complete()


_RENAMES = (
    (re.compile(r"^model\.transformer\.wte\.(embedding|new_embedding)$"), "language_model.embed_tokens.weight"),
    (re.compile(r"^model\.transformer\.blocks\.(\d+)\.att_proj\.(weight|bias)$"), r"language_model.layers.\1.self_attn.qkv_proj.\2"),
    (re.compile(r"^model\.transformer\.blocks\.(\d+)\.attn_out\.weight$"), r"language_model.layers.\1.self_attn.o_proj.weight"),
    (re.compile(r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.weight$"), r"language_model.layers.\1.input_layernorm.weight"),
    (re.compile(r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.weight$"), r"language_model.layers.\1.post_attention_layernorm.weight"),
    (re.compile(r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.weight$"), r"language_model.layers.\1.mlp.gate_up_proj.weight"),
    (re.compile(r"^model\.transformer\.blocks\.(\d+)\.ff_out\.weight$"), r"language_model.layers.\1.mlp.down_proj.weight"),
    (re.compile(r"^model\.transformer\.ln_f\.weight$"), "language_model.norm.weight"),
    (re.compile(r"^model\.transformer\.ff_out\.weight$"), "lm_head.weight"),
    (re.compile(r"^model\.vision_backbone\.(.*)$"), r"vision_backbone.\1"),
)


def _param_for(name: str) -> tuple[str, str]:
    """Checkpoint name → (parameter name here, shard label or ""); unknown names come back
    unchanged (the tracker reports them as unexpected)."""
    for pattern, repl in _RENAMES:
        match = pattern.match(name)
        if match:
            shard = match.group(1) if repl == "language_model.embed_tokens.weight" else ""
            return pattern.sub(repl, name), shard
    return name, ""

