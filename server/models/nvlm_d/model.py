"""NVLM-D: the InternViT tower, pixel shuffle and mlp1 (`vision.py`) plus a Qwen2 decoder over
the paged KV cache, implementing `server/models/interfaces.py::VLModel`.

Decoder layer (Qwen2): RMSNorm → attention (q/k/v in one matmul with bias, 1-D RoPE, GQA,
paged cache, o_proj without bias) → RMSNorm (residual add fused) → SwiGLU MLP. The
checkpoint's separate q/k/v and gate/up tensors are fused at load time; the vision qkv,
q/k-norm and proj tensors lose their zero dummy heads (see `vision.py`).

Published weight names (NVLM-D-72B's model.safetensors.index.json): `vision_model.*`,
`mlp1.{0,1,3}.*`, `language_model.model.*`, `language_model.lm_head.weight`.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.models.interfaces import KVCacheSpec
from vlmserve.models.layers.decoder import TextDecoder
from vlmserve.models.layers.rotary import rope_cos_sin, rope_inv_freq
from vlmserve.models.layers.weights import IGNORED_SUFFIXES, WeightLoadTracker
from vlmserve.models.nvlm_d.config import NVLMDModelConfig
from vlmserve.models.nvlm_d.vision import NVLMDVision, normalize_tiles
from vlmserve.multimodal.inputs import MultiModalItem
from vlmserve.runner.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)

Device = torch.device | str


class NVLMDForCausalLM(nn.Module):
    """Parameters are allocated uninitialised: `load_weights` must run before use."""

    uses_mrope = False
    cross_kv_cache_spec = None  # inline embeddings: no cross-attention K/V

    def __init__(self, config: NVLMDModelConfig, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.config = config
        self.kv_cache_spec = KVCacheSpec(config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
        meta = torch.device("meta")
        self.vision = NVLMDVision(config, dtype, meta)
        c = config
        self.language_model = TextDecoder(
            c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.rms_norm_eps, qkv_bias=True, dtype=dtype, device=meta, act=c.hidden_act,
        )
        self.lm_head: nn.Linear | None = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=meta)
        self.to_empty(device=device)
        self._inv_freq: torch.Tensor | None = None
        self._luts: dict[bytes, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    # --- VLModel -------------------------------------------------------------------------

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)

    def embed_multimodal(self, items: list[MultiModalItem]) -> list[torch.Tensor]:
        """All tiles of all items in one vision batch; item i gets tiles_i * tokens_per_tile rows
        [n_i, hidden], tile by tile (its grid row-major, then the thumbnail), which fill its
        `<|vision_pad|>` positions in order. Items carry uint8 tiles (see `processor.py`),
        normalised here, on the device (`kernels.normalize_patchify`)."""
        if not items:
            return []
        rows, counts = [], []
        for item in items:
            tiles, lut = self._vision_input(item)
            rows.append(normalize_tiles(tiles, lut, self.config.vision.patch_size, self.vision.dtype))
            counts.append(tiles.shape[0])
        out = self.vision(torch.cat(rows), sum(counts))
        return list(out.split([n * self.config.tokens_per_tile for n in counts]))

    def _vision_input(self, item: MultiModalItem) -> tuple[torch.Tensor, torch.Tensor]:
        data, what = item.data, f"{item.modality} item {item.content_hash[:16]}"
        if not {"tiles", "lut"} <= set(data):
            raise ValueError(
                f"{what}: data must hold 'tiles' and 'lut' (the NVLM-D processor's output), got keys {sorted(data)}"
            )
        tiles = np.asarray(data["tiles"])
        s = self.config.image_size
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[1:] != (s, s, 3) or tiles.shape[0] < 1:
            raise ValueError(f"{what}: tiles must be uint8 [T, {s}, {s}, 3], got {tiles.dtype} {list(tiles.shape)}")
        if item.num_embeds != tiles.shape[0] * self.config.tokens_per_tile:
            raise ValueError(
                f"{what} marks {item.num_embeds} image positions but its {tiles.shape[0]} tiles give "
                f"{tiles.shape[0] * self.config.tokens_per_tile} rows"
            )
        lut = np.asarray(data["lut"])
        if lut.dtype != np.float32 or lut.shape != (3, 256):
            raise ValueError(f"{what}: lut must be float32 [3, 256], got {lut.dtype} {list(lut.shape)}")
        key = lut.tobytes()
        lut_t = self._luts.get(key)
        if lut_t is None:
            if len(self._luts) >= 8:
                self._luts.clear()
            lut_t = self._luts[key] = torch.from_numpy(lut.copy()).to(self.device)
        pixels = torch.from_numpy(tiles if tiles.flags.writeable else tiles.copy()).to(self.device)
        return pixels, lut_t

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """inputs_embeds [T, hidden]; positions int64 [T] → final-normed hidden [T, hidden]."""
        if positions.dim() != 1:
            raise ValueError(f"NVLM-D takes 1-D positions [T], got shape {tuple(positions.shape)}")
        inv_freq = self._inv_freq
        if inv_freq is None or inv_freq.device != inputs_embeds.device:
            inv_freq = self._inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta, inputs_embeds.device)
        cos, sin = rope_cos_sin(positions, inv_freq)  # [T, D/2] float32
        return self.language_model(inputs_embeds, cos, sin, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight if self.lm_head is not None else self.language_model.embed_tokens.weight
        return F.linear(hidden, weight).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The published layout (module docstring). Raises naming every missing or unexpected
        tensor, and for dummy heads that are not zero where stripping needs them to be."""
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

        used_layers = cfg.vision_layers_used
        saw_lm_head = False
        for hf_name, tensor in weights:
            if hf_name.endswith(IGNORED_SUFFIXES):
                continue
            layer = _VISION_LAYER.match(hf_name)
            if layer and int(layer.group(1)) >= used_layers:
                continue  # after select_layer: never run
            param_name, shard = _param_for(hf_name)
            if param_name == "lm_head.weight":
                saw_lm_head = True
                if self.lm_head is None:
                    continue
            tensor = self._strip_dummy_heads(param_name, tensor, hf_name)
            if param_name == "vision.vision_model.embeddings.patch_embedding.weight" and tensor.dim() == 4:
                tensor = tensor.flatten(1)  # Conv2d [C, 3, P, P] → [C, 3*P*P]
            tracker.copy(param_name, tensor, hf_name, shard)

        if self.lm_head is not None and not saw_lm_head:
            logger.warning("checkpoint has no lm_head weight although tie_word_embeddings is false: tying it")
            self.lm_head = None
            tracker.drop("lm_head.weight")
        tracker.check_complete()

    def _strip_dummy_heads(self, param_name: str, tensor: torch.Tensor, source: str) -> torch.Tensor:
        """The real heads of a padded (H + dummy heads) vision attention tensor; others unchanged.
        The dummy count comes from the tensor's shape (7 in NVLM-D-72B, 0 in a plain InternViT)."""
        v = self.config.vision
        c, hd = v.hidden_size, v.head_dim
        if ".attn.qkv." in param_name:
            padded = tensor.shape[0] // 3
            if tensor.shape[0] % 3 or padded % hd or padded < c:
                raise ValueError(f"{source}: shape {tuple(tensor.shape)} is not 3 x (heads x {hd}) rows")
            return tensor.view(3, padded, *tensor.shape[1:])[:, :c].reshape(3 * c, *tensor.shape[1:])
        if param_name.endswith((".attn.q_norm.weight", ".attn.k_norm.weight")):
            return tensor[:c]
        if param_name.endswith(".attn.proj.weight") and tensor.dim() == 2 and tensor.shape[1] > c:
            if tensor.shape[1] % hd:
                raise ValueError(f"{source}: {tensor.shape[1]} input columns are not whole heads of {hd}")
            if torch.count_nonzero(tensor[:, c:]):
                raise ValueError(
                    f"{source}: the dummy heads' output columns ({c}:{tensor.shape[1]}) are not zero, so they "
                    "would change the output; this checkpoint is not NVLM-D's padded InternViT"
                )
            return tensor[:, :c]
        return tensor


_VISION_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")
# Checkpoint name prefixes → module prefixes here; first match wins.
_PREFIXES = (
    ("vision_model.", "vision.vision_model."),
    ("mlp1.0.", "vision.mlp1.norm."),
    ("mlp1.1.", "vision.mlp1.fc1."),
    ("mlp1.3.", "vision.mlp1.fc2."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
)
# Separate projections fused into one parameter; group 2 names the shard ("k" → "k_proj").
_FUSED = (
    (re.compile(r"^(.*\.self_attn\.)(q|k|v)_proj\.(weight|bias)$"), r"\1qkv_proj.\3"),
    (re.compile(r"^(.*\.mlp\.)(gate|up)_proj\.weight$"), r"\1gate_up_proj.weight"),
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
