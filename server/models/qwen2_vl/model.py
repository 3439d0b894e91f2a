"""Qwen2-VL: the vision tower (`vision.py`) plus a Qwen2 decoder over the paged KV cache,
implementing `server/models/interfaces.py::VLModel`.

Decoder layer: RMSNorm → attention (q/k/v in one matmul with bias, M-RoPE, paged cache,
o_proj without bias) → RMSNorm (residual add fused) → SwiGLU MLP (gate/up in one matmul).
The checkpoint's separate q/k/v and gate/up tensors are fused at load time.
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
from vlmserve.models.layers.rotary import mrope_cos_sin, scaled_rope_inv_freq
from vlmserve.models.layers.weights import IGNORED_SUFFIXES, WeightLoadTracker
from vlmserve.models.qwen2_vl.config import Qwen2VLModelConfig
from vlmserve.models.qwen2_vl.image_processor import uint8_tensor
from vlmserve.models.qwen2_vl.vision import Qwen2VisionTransformer
from vlmserve.multimodal.inputs import MultiModalItem
from vlmserve.runner.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)

Device = torch.device | str


class Qwen2VLForConditionalGeneration(nn.Module):
    """Parameters are allocated uninitialised: `load_weights` must run before use."""

    uses_mrope = True
    cross_kv_cache_spec = None  # inline embeddings: no cross-attention K/V

    supports_tensor_parallel = True  # the decoder is split (`tp`); the vision tower is replicated

    def __init__(self, config: Qwen2VLModelConfig, dtype: torch.dtype, device: Device, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        # This rank's KV heads (all of them when tp.size == 1).
        kv_heads = local_kv_heads(config.num_key_value_heads, tp)
        self.kv_cache_spec = KVCacheSpec(config.num_hidden_layers, kv_heads, config.head_dim)
        # Built on the meta device, then given real (uninitialised) storage: no time spent on
        # random init of weights the checkpoint overwrites.
        meta = torch.device("meta")
        self.visual = Qwen2VisionTransformer(config.vision, dtype, meta)
        c = config
        self.language_model = TextDecoder(
            c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.rms_norm_eps, qkv_bias=True, dtype=dtype, device=meta, act=c.hidden_act,
            tp=tp,
        )
        self.lm_head: ParallelLMHead | None = None
        self._luts: dict[bytes, torch.Tensor] = {}  # normalisation tables on the device, by content
        self._inv_freq: torch.Tensor | None = None  # the text rotary's, built at the first forward
        if not config.tie_word_embeddings:
            self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, tp, dtype, meta)
        self.to_empty(device=device)

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    # --- VLModel -------------------------------------------------------------------------

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """All items (images and videos) in one vision batch; item i gets t*h*w / m^2 rows.

        Items carry resized uint8 pixels (see `processor.py`); they are uploaded as bytes and
        normalised + patchified here, on the model's device, by `kernels.normalize_patchify`
        (Triton on CUDA, the PyTorch reference elsewhere), straight into the tower's dtype."""
        if not items:
            return []
        rows, grids = [], []
        for item in items:
            pixels, lut, grid = self._vision_input(item)
            rows.append(kernels.normalize_patchify(pixels, lut, *self._patchify, "qwen2_vl", self.visual.dtype))
            grids.append(grid)
        merged = self.visual(torch.cat(rows), grids)
        m2 = self.config.vision.spatial_merge_size**2
        return list(merged.split([t * h * w // m2 for t, h, w in grids]))

    @property
    def _patchify(self) -> tuple[int, int, int]:
        v = self.config.vision
        return v.patch_size, v.spatial_merge_size, v.temporal_patch_size

    def _vision_input(self, item: MultiModalItem) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
        """Checks one item's data against this tower; returns (uint8 pixels and float32 [3, 256]
        table, both on the device, and the grid)."""
        data, what = item.data, f"{item.modality} item {item.content_hash[:16]}"
        if not {"pixels", "grid_thw", "lut", "patchify"} <= set(data):
            raise ValueError(
                f"{what}: data must hold 'pixels', 'grid_thw', 'lut' and 'patchify' (the Qwen2-VL processor's "
                f"output), got keys {sorted(data)}"
            )
        if tuple(data["patchify"]) != self._patchify:
            raise ValueError(
                f"{what}: patchified as (patch, merge, temporal) = {tuple(data['patchify'])} but the vision tower "
                f"takes {self._patchify}; the processor and model configs do not match"
            )
        grid = tuple(int(g) for g in data["grid_thw"])
        if len(grid) != 3:
            raise ValueError(f"{what}: grid_thw must hold 3 values (t, h, w), got {list(grid)}")
        pixels = np.asarray(data["pixels"])
        p, _, tp = self._patchify
        # An image is [H, W, 3] (one temporal patch); a video [grid_t * tp, H, W, 3].
        frames = grid[0] * tp if pixels.ndim == 4 else None
        expected = (*(() if frames is None else (frames,)), grid[1] * p, grid[2] * p, 3)
        if pixels.dtype != np.uint8 or pixels.shape != expected or (frames is None and grid[0] != 1):
            raise ValueError(
                f"{what}: pixels must be uint8 {list(expected)} for grid_thw {grid}, got {pixels.dtype} "
                f"{list(pixels.shape)}"
            )
        device = self.device
        return uint8_tensor(pixels).to(device), self._lut_on_device(np.asarray(data["lut"])), grid

    def _lut_on_device(self, lut: np.ndarray) -> torch.Tensor:
        """The item's table on the device, cached by content (a processor has one table per
        modality; every request's copy of it is equal)."""
        if lut.dtype != np.float32 or lut.shape != (3, 256):
            raise ValueError(f"lut must be float32 [3, 256], got {lut.dtype} {list(lut.shape)}")
        key = lut.tobytes()
        cached = self._luts.get(key)
        if cached is None:
            if len(self._luts) >= 8:
                self._luts.clear()
            cached = self._luts[key] = torch.from_numpy(lut.copy()).to(self.device)
        return cached

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """inputs_embeds [T, hidden]; positions int64 [3, T] (M-RoPE t/h/w) or [T] (text
        only: the same on all axes) → final-normed hidden [T, hidden]."""
        inv_freq = self._inv_freq
        if inv_freq is None or inv_freq.device != inputs_embeds.device:
            c = self.config
            inv_freq = self._inv_freq = scaled_rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, inputs_embeds.device)
        cos, sin = mrope_cos_sin(positions, inv_freq, self.config.mrope_section)  # [T, D/2] float32
        return self.language_model(inputs_embeds, cos, sin, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight if self.lm_head is not None else self.language_model.embed_tokens.weight
        return parallel_logits(hidden, weight, self.config.vocab_size, self.tp)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Accepts the published layout (`model.layers.*`, `visual.*`) and the transformers-5
        one (`model.language_model.layers.*`, `model.visual.*`). Raises naming every
        missing or unexpected tensor."""
        cfg = self.config
        tracker = WeightLoadTracker(self)
        kv_rows = cfg.num_key_value_heads * cfg.head_dim
        for i in range(cfg.num_hidden_layers):
            prefix = f"language_model.layers.{i}"
            qkv = [("q_proj", cfg.hidden_size), ("k_proj", kv_rows), ("v_proj", kv_rows)]
            tracker.declare_fused(f"{prefix}.self_attn.qkv_proj.weight", qkv)
            tracker.declare_fused(f"{prefix}.self_attn.qkv_proj.bias", qkv)
            gate_up = [("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size)]
            tracker.declare_fused(f"{prefix}.mlp.gate_up_proj.weight", gate_up)

        saw_lm_head = False
        for hf_name, tensor in weights:
            if hf_name.endswith(IGNORED_SUFFIXES):
                continue
            param_name, shard = _param_for(hf_name)
            if param_name == "lm_head.weight":
                saw_lm_head = True
                if self.lm_head is None:
                    continue  # tied: some tied checkpoints still save a copy of the embeddings
            if param_name == "visual.patch_embed.weight" and tensor.dim() == 5:
                tensor = tensor.flatten(1)  # Conv3d [E, C, T, P, P] → [E, C*T*P*P]
            tracker.copy(param_name, tensor, hf_name, shard)

        if self.lm_head is not None and not saw_lm_head:
            logger.warning(
                "checkpoint has no lm_head.weight although tie_word_embeddings is false: tying the output "
                "projection to the input embeddings"
            )
            self.lm_head = None
            tracker.drop("lm_head.weight")
        tracker.check_complete()


# Checkpoint name prefixes → module prefixes here; first match wins (longest first).
_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("model.visual.", "visual."),
    ("visual.", "visual."),
    ("model.", "language_model."),
    ("lm_head.", "lm_head."),
)
# Separate projections fused into one parameter; group 2 names the shard ("k" → "k_proj").
_FUSED = (
    (re.compile(r"^(.*\.self_attn\.)(q|k|v)_proj\.(weight|bias)$"), r"\1qkv_proj.\3"),
    (re.compile(r"^(.*\.mlp\.)(gate|up)_proj\.weight$"), r"\1gate_up_proj.weight"),
)
_RENAMES = (
    ("visual.patch_embed.proj.weight", "visual.patch_embed.weight"),
    ("visual.merger.mlp.0.", "visual.merger.fc1."),
    ("visual.merger.mlp.2.", "visual.merger.fc2."),
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
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old) :], ""
    return name, ""
