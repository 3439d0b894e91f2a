"""Llama 3.2 Vision (Mllama): the vision tower (`vision.py`), a projector, and a Llama decoder
whose layers at `cross_attention_layers` are gated cross-attention layers over the request's
image rows. Implements `server/models/interfaces.py::VLModel`.

Self-attention layer: RMSNorm → attention (fused q/k/v, llama3-scaled 1-D RoPE, paged cache)
→ residual → RMSNorm → SwiGLU MLP → residual. Only these layers own a paged KV cache:
`kv_cache_spec.num_layers` counts them, in layer order.

Cross-attention layer (transformers' `MllamaCrossAttentionDecoderLayer`):
    h = h + tanh(attn_gate) * o_proj(attend(q_norm(q_proj(norm(h))), cross K/V))
    h = h + tanh(mlp_gate) * row_mask * mlp(norm(h))
K/V are k_norm(k_proj(rows)) and v_proj(rows) of the request's cross rows, written once by
`write_cross_kv` (one cache pair per cross layer). Per token:
- its request has no cross rows (text-only, or no `batch.cross`): the layer leaves it
  unchanged, as transformers skips cross layers when there are no images;
- its range is empty (the prompt before the first image): it attends to ALL the request's
  rows and row_mask = 0 (transformers' `full_text_row_masked_out_mask`);
- otherwise it attends to `cross.ranges[t]` and row_mask = 1.
Row layout and ranges are the processor's (see `processor.py`).

Tensor parallelism (`tp`): self- and cross-attention split by q heads and KV heads (as the
shared decoder), MLPs by intermediate rows, embedding and LM head by vocabulary; the
vision tower and projector are replicated on every rank (each rank writes its KV heads of
the cross K/V from the same rows).
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmserve import kernels
from vlmserve.models.interfaces import KVCacheSpec
from vlmserve.models.layers.decoder import GatedMLP, PagedSelfAttention
from vlmserve.models.layers.norm import RMSNorm
from vlmserve.models.layers.parallel import (
    SINGLE, ColumnParallelLinear, ParallelLMHead, RowParallelLinear, TPGroup, VocabParallelEmbedding, divide,
    even_split, kv_head_split, local_kv_heads, parallel_logits,
)
from vlmserve.models.layers.pixels import DeviceLuts, uint8_tensor
from vlmserve.models.layers.rotary import rope_cos_sin, scaled_rope_inv_freq
from vlmserve.models.layers.weights import IGNORED_SUFFIXES, WeightLoadTracker
from vlmserve.models.mllama.config import MllamaModelConfig
from vlmserve.models.mllama.vision import MllamaVisionModel
from vlmserve.multimodal.inputs import MultiModalItem
from vlmserve.runner.forward_batch import CrossAttentionBatch, ForwardBatch


Device = torch.device | str


class MllamaSelfAttentionLayer(nn.Module):
    def __init__(self, cfg: MllamaModelConfig, cache_idx: int, dtype: torch.dtype, device: Device, tp: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = PagedSelfAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cache_idx,
            qkv_bias=False, dtype=dtype, device=device, tp=tp,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype, device, cfg.hidden_act, tp)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class MllamaCrossAttention(nn.Module):
    def __init__(self, cfg: MllamaModelConfig, cross_idx: int, dtype: torch.dtype, device: Device, tp: TPGroup) -> None:
        super().__init__()
        self.cross_idx = cross_idx
        self.head_dim = cfg.head_dim
        # This rank's heads (see layers/decoder.PagedSelfAttention).
        self.num_heads = divide(cfg.num_attention_heads, tp, "the number of attention heads")
        self.num_kv_heads = local_kv_heads(cfg.num_key_value_heads, tp)
        self.kv_size = self.num_kv_heads * self.head_dim
        h, q_full, kv_full = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = ColumnParallelLinear(h, [("", q_full, even_split(tp))], False, dtype, device)
        # Rows: k (Hkv * D), then v (Hkv * D); applied to image rows only, in write_kv.
        kv = kv_head_split(tp, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_proj = ColumnParallelLinear(h, [("k_proj", kv_full, kv), ("v_proj", kv_full, kv)], False, dtype, device)
        self.o_proj = RowParallelLinear(q_full, h, False, tp, dtype, device)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype, device)

    def write_kv(self, rows: torch.Tensor, slot_mapping: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]) -> None:
        """rows [n, hidden] → k_norm(k), v [n, Hkv, D] written at slot_mapping [n]."""
        n = rows.shape[0]
        k, v = self.kv_proj(rows).split([self.kv_size, self.kv_size], dim=-1)
        k = self.k_norm(k.reshape(n * self.num_kv_heads, self.head_dim)).view(n, self.num_kv_heads, self.head_dim)
        kernels.write_kv(k, v.reshape(n, self.num_kv_heads, self.head_dim), cache[0], cache[1], slot_mapping)

    def forward(self, x: torch.Tensor, cross: CrossAttentionBatch, query_start_loc: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(n * self.num_heads, self.head_dim)).view(n, self.num_heads, self.head_dim)
        k_cache, v_cache = cross.kv_caches[self.cross_idx]
        out = kernels.cross_attention(
            q, k_cache, v_cache, cross.block_tables, cross.seq_lens, cross.ranges, query_start_loc, self.head_dim**-0.5
        )
        return self.o_proj(out.reshape(n, -1))


class MllamaCrossAttentionLayer(nn.Module):
    def __init__(self, cfg: MllamaModelConfig, cross_idx: int, dtype: torch.dtype, device: Device, tp: TPGroup) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.cross_attn = MllamaCrossAttention(cfg, cross_idx, dtype, device, tp)
        self.cross_attn_attn_gate = nn.Parameter(torch.empty(1, dtype=dtype, device=device))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, dtype, device, cfg.hidden_act, tp)
        self.cross_attn_mlp_gate = nn.Parameter(torch.empty(1, dtype=dtype, device=device))

    def forward(
        self, h: torch.Tensor, cross: CrossAttentionBatch, query_start_loc: torch.Tensor,
        attn_mask: torch.Tensor, mlp_mask: torch.Tensor,
    ) -> torch.Tensor:
        """attn_mask, mlp_mask [T, 1] of 0/1 in h's dtype (see the module docstring)."""
        out = self.cross_attn(self.input_layernorm(h), cross, query_start_loc)
        h = h + attn_mask * (self.cross_attn_attn_gate.tanh() * out)
        out = mlp_mask * self.mlp(self.post_attention_layernorm(h))
        return h + self.cross_attn_mlp_gate.tanh() * out


class MllamaTextModel(nn.Module):
    def __init__(self, cfg: MllamaModelConfig, dtype: torch.dtype, device: Device, tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.num_embeddings, cfg.hidden_size, tp, dtype, device)
        layers: list[nn.Module] = []
        for i in range(cfg.num_hidden_layers):
            if i in cfg.cross_attention_layers:
                layers.append(MllamaCrossAttentionLayer(cfg, cfg.cross_attention_layers.index(i), dtype, device, tp))
            else:
                layers.append(MllamaSelfAttentionLayer(cfg, cfg.self_attention_layers.index(i), dtype, device, tp))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class MllamaForConditionalGeneration(nn.Module):
    """Parameters are allocated uninitialised: `load_weights` must run before use."""

    uses_mrope = False
    supports_tensor_parallel = True  # the decoder is split (`tp`); the vision tower is replicated

    def __init__(self, config: MllamaModelConfig, dtype: torch.dtype, device: Device, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        kv_heads = local_kv_heads(config.num_key_value_heads, tp)  # this rank's
        self.kv_cache_spec = KVCacheSpec(len(config.self_attention_layers), kv_heads, config.head_dim)
        self.cross_kv_cache_spec = KVCacheSpec(len(config.cross_attention_layers), kv_heads, config.head_dim)
        meta = torch.device("meta")
        self.vision_model = MllamaVisionModel(config.vision, dtype, meta)
        self.multi_modal_projector = nn.Linear(
            config.vision.vision_output_dim, config.hidden_size, dtype=dtype, device=meta
        )
        self.language_model = MllamaTextModel(config, dtype, meta, tp)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, tp, dtype, meta)
        self.to_empty(device=device)
        self._luts = DeviceLuts()
        inv_freq = scaled_rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    # --- VLModel -------------------------------------------------------------------------

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """All images in one vision batch. Each item gets `rows_per_image` = max_num_tiles *
        num_patches rows [rows, hidden]: its tiles in order (real tiles first, then the
        padded ones), num_patches rows per tile, class token first."""
        if not items:
            return []
        vcfg = self.config.vision
        pixels, ratio_ids, num_tiles = [], [], []
        for item in items:
            data = item.data
            if not {"pixels", "lut", "aspect_ratio", "aspect_ratio_id", "num_tiles"} <= set(data):
                raise ValueError(
                    f"image item {item.content_hash[:16]}: data must hold pixels, lut, aspect_ratio, aspect_ratio_id "
                    f"and num_tiles (the Mllama processor's output), got keys {sorted(data)}"
                )
            pv = self._tiles(item)
            n = int(data["num_tiles"])
            if item.cross_attn_tokens != vcfg.rows_per_image:
                raise ValueError(
                    f"image item {item.content_hash[:16]} declares {item.cross_attn_tokens} cross rows, "
                    f"this model gives {vcfg.rows_per_image} per image"
                )
            pixels.append(F.pad(pv, (0, 0, 0, 0, 0, 0, 0, vcfg.max_num_tiles - n)))  # zero tiles, as transformers
            ratio_ids.append(int(data["aspect_ratio_id"]))
            num_tiles.append(n)
        features = self.vision_model(
            torch.stack(pixels).to(self.device), torch.tensor(ratio_ids, device=self.device), num_tiles
        )  # [B, T, P, vision_output_dim]
        rows = self.multi_modal_projector(features.to(self.multi_modal_projector.weight.dtype))
        return list(rows.flatten(1, 2).unbind(0))

    def _tiles(self, item: MultiModalItem) -> torch.Tensor:
        """The item's uint8 canvas [rows * S, cols * S, 3] → normalised tiles [rows * cols, 3, S, S]
        in the tower's dtype, on the device: `kernels.normalize_patchify` over the canvas in
        the tower's own P x P patches (a layout its Triton kernel tiles well), then a permute of
        those patches into tiles. Bit-identical to the processor's float32 tiles cast."""
        vcfg, data = self.config.vision, item.data
        s, p = vcfg.image_size, vcfg.patch_size
        rows, cols = (int(r) for r in data["aspect_ratio"])
        canvas = np.asarray(data["pixels"])
        if (canvas.dtype != np.uint8 or canvas.shape != (rows * s, cols * s, 3) or rows * cols != int(data["num_tiles"])
                or not 1 <= rows * cols <= vcfg.max_num_tiles or s % p):
            raise ValueError(
                f"image item {item.content_hash[:16]}: pixels must be uint8 [{rows * s}, {cols * s}, 3] for "
                f"{rows}x{cols} tiles of {s} px ({data['num_tiles']} tiles), got {canvas.dtype} {list(canvas.shape)}"
            )
        dtype = self.vision_model.patch_embedding.weight.dtype
        lut = self._luts.get(data["lut"], self.device)
        patches = kernels.normalize_patchify(uint8_tensor(canvas).to(self.device), lut, p, 1, 1, "patches", dtype)
        g = s // p  # patches per tile side
        # [rows, g, cols, g, 3, p, p] → [rows, cols, 3, g, p, g, p]: tile, channel, pixel row, pixel col.
        tiles = patches.view(rows, g, cols, g, 3, p, p).permute(0, 2, 4, 1, 5, 3, 6)
        return tiles.reshape(rows * cols, 3, s, s)

    def write_cross_kv(
        self,
        encoder_rows: torch.Tensor,
        slot_mapping: torch.Tensor,
        cross_kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """encoder_rows [n, hidden]: row r is written, projected for every cross layer, at
        slot_mapping[r] (int64 [n]). The slots decide the cross-sequence position of each row
        (see `processor.cross_row_positions` for the layout the ranges assume)."""
        if len(cross_kv_caches) != self.cross_kv_cache_spec.num_layers:
            raise ValueError(
                f"{len(cross_kv_caches)} cross K/V caches given, the model has "
                f"{self.cross_kv_cache_spec.num_layers} cross-attention layers"
            )
        rows = encoder_rows.to(device=self.device, dtype=self.lm_head.weight.dtype)
        for layer in self.language_model.layers:
            if isinstance(layer, MllamaCrossAttentionLayer):
                layer.cross_attn.write_kv(rows, slot_mapping, cross_kv_caches[layer.cross_attn.cross_idx])

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """inputs_embeds [T, hidden]; positions int64 [T] → final-normed hidden [T, hidden]."""
        cos, sin = rope_cos_sin(positions, self.inv_freq)  # [T, D/2] float32
        cross, masks = batch.cross, None
        if cross is not None and any(n > 0 for n in (cross.seq_lens_cpu or cross.seq_lens.tolist())):
            counts = torch.diff(batch.query_start_loc.long())
            has_rows = torch.repeat_interleave(cross.seq_lens > 0, counts)  # [T]
            non_empty = cross.ranges[:, 1] > cross.ranges[:, 0]
            masks = (has_rows.to(inputs_embeds.dtype)[:, None], (has_rows & non_empty).to(inputs_embeds.dtype)[:, None])
        h = inputs_embeds
        for layer in self.language_model.layers:
            if isinstance(layer, MllamaCrossAttentionLayer):
                if masks is not None:  # no request with images: transformers skips these layers
                    h = layer(h, cross, batch.query_start_loc, *masks)
            else:
                h = layer(h, cos, sin, batch)
        return self.language_model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return parallel_logits(hidden, self.lm_head.weight, self.config.vocab_size, self.tp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Accepts the published names (`language_model.model.*`, `language_model.lm_head.*`,
        `vision_model.*`, `multi_modal_projector.*`) and transformers-5's (`model.language_model.*`,
        `model.vision_model.*`, `model.multi_modal_projector.*`, `lm_head.*`)."""
        cfg = self.config
        tracker = WeightLoadTracker(self)
        kv = cfg.num_key_value_heads * cfg.head_dim
        for i, layer in enumerate(self.language_model.layers):
            p = f"language_model.layers.{i}"
            inter = cfg.intermediate_size
            tracker.declare_fused(f"{p}.mlp.gate_up_proj.weight", [("gate_proj", inter), ("up_proj", inter)])
            if isinstance(layer, MllamaCrossAttentionLayer):
                tracker.declare_fused(f"{p}.cross_attn.kv_proj.weight", [("k_proj", kv), ("v_proj", kv)])
            else:
                qkv = [("q_proj", cfg.hidden_size), ("k_proj", kv), ("v_proj", kv)]
                tracker.declare_fused(f"{p}.self_attn.qkv_proj.weight", qkv)
        vh = cfg.vision.hidden_size
        for stack, n in (("layers", cfg.vision.num_hidden_layers), ("global_layers", cfg.vision.num_global_layers)):
            for i in range(n):
                qkv = [("q_proj", vh), ("k_proj", vh), ("v_proj", vh)]
                tracker.declare_fused(f"vision_model.{stack}.{i}.qkv_proj.weight", qkv)
        for hf_name, tensor in weights:
            if hf_name.endswith(IGNORED_SUFFIXES):
                continue
            name, shard = _param_for(hf_name)
            if name == "vision_model.patch_embedding.weight" and tensor.dim() == 4:
                tensor = tensor.flatten(1)  # Conv2d [H, C, P, P] → [H, C*P*P]
            tracker.copy(name, tensor, hf_name, shard)
        tracker.check_complete()


_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
# (pattern, replacement, group naming the shard or None), applied after the prefixes.
_RENAMES = (
    (re.compile(r"^(language_model\.layers\.\d+\.self_attn\.)(q|k|v)_proj\.weight$"), r"\1qkv_proj.weight", 2),
    (re.compile(r"^(language_model\.layers\.\d+\.cross_attn\.)(k|v)_proj\.weight$"), r"\1kv_proj.weight", 2),
    (re.compile(r"^(language_model\.layers\.\d+\.mlp\.)(gate|up)_proj\.weight$"), r"\1gate_up_proj.weight", 2),
    # Vision layers: `transformer.layers` → `layers`, `global_transformer.layers` → `global_layers`.
    (re.compile(r"^vision_model\.transformer\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\."),
     r"vision_model.layers.\1.qkv_proj.", 2),
    (re.compile(r"^vision_model\.global_transformer\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\."),
     r"vision_model.global_layers.\1.qkv_proj.", 2),
    (re.compile(r"^vision_model\.transformer\.layers\.(\d+)\.(?:self_attn|mlp)\."), r"vision_model.layers.\1.", None),
    (re.compile(r"^vision_model\.global_transformer\.layers\.(\d+)\.(?:self_attn|mlp)\."),
     r"vision_model.global_layers.\1.", None),
    (re.compile(r"^vision_model\.transformer\.layers\."), "vision_model.layers.", None),
    (re.compile(r"^vision_model\.global_transformer\.layers\."), "vision_model.global_layers.", None),
    (re.compile(r"^vision_model\.gated_positional_embedding\.embedding$"), "vision_model.position_embedding", None),
    (re.compile(r"^vision_model\.gated_positional_embedding\.gate$"), "vision_model.position_gate", None),
    (re.compile(r"^vision_model\.gated_positional_embedding\.tile_embedding\."),
     "vision_model.tile_position_embedding.", None),
    (re.compile(r"^vision_model\.(pre|post)_tile_positional_embedding\.embedding\."),
     r"vision_model.\1_tile_embedding.", None),
    (re.compile(r"^vision_model\.(pre|post)_tile_positional_embedding\.gate$"), r"vision_model.\1_tile_gate", None),
)


def _param_for(hf_name: str) -> tuple[str, str]:
    """Checkpoint tensor name → (parameter name here, shard label or ""). Unknown names come
    back unchanged and are reported as unexpected by the tracker."""
    name = hf_name
    for old, new in _PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    for pattern, repl, shard_group in _RENAMES:
        match = pattern.match(name)
        if match:
            shard = f"{match.group(shard_group)}_proj" if shard_group else ""
            return pattern.sub(repl, name, count=1), shard
    return name, ""
