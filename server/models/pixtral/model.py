"""Pixtral: the Pixtral vision tower and Llava projector (`vision.py`) plus a Mistral decoder
over the paged KV cache, implementing `server/models/interfaces.py::VLModel`.

Decoder layer: RMSNorm → attention (q/k/v in one matmul, no bias, 1-D RoPE, GQA, explicit
head_dim, paged cache) → RMSNorm (residual add fused) → SwiGLU MLP (gate/up in one matmul).

Weights load from three layouts (see `load_weights`): the published HF one, the
transformers-5 one, and the Mistral one (`consolidated.safetensors`, renamed and q/k
permuted by `mistral_format.py`).
"""

from __future__ import annotations

import logging
import re
from typing import Iterable

import numpy as np
import torch
from torch import nn

from vlmserve import kernels
from vlmserve.models.interfaces import KVCacheSpec
from vlmserve.models.layers.decoder import TextDecoder
from vlmserve.models.layers.parallel import SINGLE, ParallelLMHead, TPGroup, local_kv_heads, parallel_logits
from vlmserve.models.layers.pixels import DeviceLuts, uint8_tensor
from vlmserve.models.layers.rotary import rope_cos_sin, scaled_rope_inv_freq
from vlmserve.models.layers.weights import IGNORED_SUFFIXES, WeightLoadTracker
from vlmserve.models.pixtral.config import PixtralModelConfig
from vlmserve.models.pixtral.image_processor import mistral_resize_normalize
from vlmserve.models.pixtral.mistral_format import is_mistral_weight_name, mistral_to_hf_weight
from vlmserve.models.pixtral.vision import LlavaMultiModalProjector, PixtralVisionModel, patchify
from vlmserve.multimodal.inputs import MultiModalItem
from vlmserve.runner.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)

Device = torch.device | str


class PixtralForConditionalGeneration(nn.Module):
    """Parameters are allocated uninitialised: `load_weights` must run before use."""

    uses_mrope = False
    cross_kv_cache_spec = None  # inline embeddings: no cross-attention K/V

    supports_tensor_parallel = True  # the decoder is split (`tp`); the vision tower is replicated

    def __init__(self, config: PixtralModelConfig, dtype: torch.dtype, device: Device, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        # This rank's KV heads (all of them when tp.size == 1).
        kv_heads = local_kv_heads(config.num_key_value_heads, tp)
        self.kv_cache_spec = KVCacheSpec(config.num_hidden_layers, kv_heads, config.head_dim)
        # Built on the meta device, then given real (uninitialised) storage: no time spent on
        # random init of weights the checkpoint overwrites.
        meta = torch.device("meta")
        self.vision_tower = PixtralVisionModel(config.vision, config.vision_feature_indices, dtype, meta)
        self.multi_modal_projector = LlavaMultiModalProjector(config, dtype, meta)
        c = config
        self.language_model = TextDecoder(
            c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.rms_norm_eps, qkv_bias=False, dtype=dtype, device=meta, act=c.hidden_act,
            tp=tp,
        )
        self.lm_head: ParallelLMHead | None = None
        if not config.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, tp, dtype, meta)
        self.to_empty(device=device)
        self._luts = DeviceLuts()

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    # --- VLModel -------------------------------------------------------------------------

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """All images in one vision batch; item i gets rows * cols rows [n_i, hidden], one per
        `[IMG]` position of its range (row-major over its patch grid).

        HF-format items carry resized uint8 pixels [rows * P, cols * P, 3] and their table
        (`lut`): uploaded as bytes, normalised and patchified here by
        `kernels.normalize_patchify` (layout "patches", Triton on CUDA) straight into the
        tower's dtype. Mistral-format items carry the uint8 source, resized and normalised here
        (`mistral_resize_normalize`), or, for sources larger than that result, float32
        `pixel_values` [3, rows * P, cols * P]."""
        if not items:
            return []
        p = self.config.vision.patch_size
        w = self.vision_tower.patch_conv.weight
        patches, grids = [], []
        for item in items:
            data, what = item.data, f"image item {item.content_hash[:16]}"
            forms = ({"pixels", "lut"}, {"source_pixels", "patch_size", "mistral_norm"}, {"pixel_values"})
            if "patch_grid" not in data or not any(f <= set(data) for f in forms):
                raise ValueError(
                    f"{what}: data must hold 'patch_grid' and 'pixels' + 'lut' (or 'source_pixels' + 'patch_size' + "
                    f"'mistral_norm', or 'pixel_values'), the Pixtral processor's output; got keys {sorted(data)}"
                )
            rows, cols = (int(g) for g in data["patch_grid"])
            if item.num_embeds != rows * cols:
                raise ValueError(
                    f"{what} marks {item.num_embeds} [IMG] positions but its patch grid {rows}x{cols} gives "
                    f"{rows * cols} rows"
                )
            if "pixels" in data:
                pixels = np.asarray(data["pixels"])
                if pixels.dtype != np.uint8 or pixels.shape != (rows * p, cols * p, 3):
                    raise ValueError(f"{what}: pixels must be uint8 [{rows * p}, {cols * p}, 3] for patch grid "
                                     f"{(rows, cols)}, got {pixels.dtype} {list(pixels.shape)}")
                lut = self._luts.get(data["lut"], w.device)
                patches.append(kernels.normalize_patchify(uint8_tensor(pixels).to(w.device), lut, p, 1, 1,
                                                          "patches", w.dtype))
            elif "source_pixels" in data:  # Mistral format: OpenCV's float resize, here on the device
                src = np.asarray(data["source_pixels"])
                if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3 or int(data["patch_size"]) != p:
                    raise ValueError(f"{what}: source_pixels must be uint8 [H, W, 3] for patch size {p}, got "
                                     f"{src.dtype} {list(src.shape)} for patch size {data['patch_size']}")
                mean, std = data["mistral_norm"]
                pv = mistral_resize_normalize(uint8_tensor(src).to(w.device), rows * p, cols * p, mean, std)
                patches.append(patchify(pv.to(w.dtype), p))
            else:
                pv = torch.as_tensor(data["pixel_values"])
                if pv.shape != (self.config.vision.num_channels, rows * p, cols * p):
                    raise ValueError(
                        f"{what}: pixel_values must be [{self.config.vision.num_channels}, {rows * p}, {cols * p}] "
                        f"for patch grid {(rows, cols)}, got {tuple(pv.shape)}"
                    )
                patches.append(patchify(pv.to(device=w.device, dtype=w.dtype), p))
            grids.append((rows, cols))
        features = self.multi_modal_projector(self.vision_tower.forward_patches(torch.cat(patches), grids))
        return list(features.split([r * c for r, c in grids]))

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """inputs_embeds [T, hidden]; positions int64 [T] → final-normed hidden [T, hidden]."""
        if positions.dim() != 1:
            raise ValueError(f"Pixtral takes 1-D positions [T], got shape {tuple(positions.shape)}")
        c = self.config
        inv_freq = scaled_rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, device=inputs_embeds.device)
        cos, sin = rope_cos_sin(positions, inv_freq)  # [T, D/2] float32
        return self.language_model(inputs_embeds, cos, sin, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight if self.lm_head is not None else self.language_model.embed_tokens.weight
        return parallel_logits(hidden, weight, self.config.vocab_size, self.tp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Accepts the published HF layout (`vision_tower.*`, `language_model.model.*`,
        `language_model.lm_head.weight`), the transformers-5 one (`model.vision_tower.*`,
        `model.language_model.*`, `lm_head.weight`) and the Mistral one (`tok_embeddings.weight`,
        `layers.*`, `vision_encoder.*`, ...). Raises naming every missing or unexpected tensor."""
        cfg = self.config
        tracker = WeightLoadTracker(self)
        kv_rows = cfg.num_key_value_heads * cfg.head_dim
        for i in range(cfg.num_hidden_layers):
            prefix = f"language_model.layers.{i}"
            qkv = [("q_proj", cfg.num_attention_heads * cfg.head_dim), ("k_proj", kv_rows), ("v_proj", kv_rows)]
            tracker.declare_fused(f"{prefix}.self_attn.qkv_proj.weight", qkv)
            gate_up = [("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size)]
            tracker.declare_fused(f"{prefix}.mlp.gate_up_proj.weight", gate_up)
        e, vi = cfg.vision.hidden_size, cfg.vision.intermediate_size
        for i in range(cfg.vision.num_hidden_layers):
            prefix = f"vision_tower.layers.{i}"
            tracker.declare_fused(f"{prefix}.attention.qkv_proj.weight", [("q_proj", e), ("k_proj", e), ("v_proj", e)])
            tracker.declare_fused(f"{prefix}.feed_forward.gate_up_proj.weight", [("gate_proj", vi), ("up_proj", vi)])

        saw_lm_head = False
        for name, tensor in weights:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            if is_mistral_weight_name(name):
                name, tensor = mistral_to_hf_weight(name, tensor, cfg)
            param_name, shard = _param_for(name)
            if param_name == "lm_head.weight":
                saw_lm_head = True
                if self.lm_head is None:
                    continue  # tied: some tied checkpoints still save a copy of the embeddings
            if param_name == "vision_tower.patch_conv.weight" and tensor.dim() == 4:
                tensor = tensor.flatten(1)  # Conv2d [E, C, P, P] → [E, C*P*P]
            tracker.copy(param_name, tensor, name, shard)

        if self.lm_head is not None and not saw_lm_head:
            logger.warning(
                "checkpoint has no lm_head weight although tie_word_embeddings is false: tying the output "
                "projection to the input embeddings"
            )
            self.lm_head = None
            tracker.drop("lm_head.weight")
        tracker.check_complete()


# Checkpoint name prefixes → module prefixes here; first match wins.
_PREFIXES = (
    ("model.vision_tower.transformer.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.transformer.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "lm_head."),
)
# Separate projections fused into one parameter; group 2 names the shard ("k" → "k_proj").
_FUSED = (
    (re.compile(r"^(.*\.(?:self_attn|attention)\.)(q|k|v)_proj\.weight$"), r"\1qkv_proj.weight"),
    (re.compile(r"^(.*\.(?:mlp|feed_forward)\.)(gate|up)_proj\.weight$"), r"\1gate_up_proj.weight"),
)


def _param_for(hf_name: str) -> tuple[str, str]:
    """Checkpoint tensor name → (parameter name here, shard label or ""). A name with no
    known prefix comes back unchanged and is reported as unexpected by the tracker."""
    name = hf_name
    for old, new in _PREFIXES:
        if name.startswith(old):
            name = new + name[len(old) :]
            break
    for pattern, repl in _FUSED:
        match = pattern.match(name)
        if match:
            return pattern.sub(repl, name), f"{match.group(2)}_proj"
    return name, ""
