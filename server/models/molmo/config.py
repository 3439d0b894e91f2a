"""Molmo v1 (`MolmoForCausalLM`, remote-code format) dimensions, parsed once from config.json.

The published config.json describes the decoder only. The official `MolmoForCausalLM.__init__`
hard-codes everything else, and so do we (`VISION_DEFAULTS` and the constants below): a CLIP
ViT-L/14-336 tower of 23 layers (the 24th is dropped), features of layers -2 and -9
concatenated, "attention-meanq" 2x2 pooling, the "pad_and_partial_pad" padding embeddings,
128 extra embedding rows (`new_embedding`, the image tokens), llama (rotate-half) RoPE, no
biases except q/k/v's (`qkv_bias`), SwiGLU.

A config.json may carry `fixture_vision_backbone` (a dict of `VisionBackboneConfig` fields):
the golden fixtures' tiny checkpoints patch the official code to read it, so the hard-coded
ViT sizes are replaced by it field by field; real checkpoints have no such key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any

logger = logging.getLogger(__name__)

# The official hard-coded VisionBackboneConfig (MolmoForCausalLM.__init__).
VISION_DEFAULTS: dict[str, Any] = dict(
    image_default_input_size=(336, 336),
    image_patch_size=14,
    image_pos_patch_size=14,
    image_emb_dim=1024,
    image_num_heads=16,
    image_num_key_value_heads=16,
    image_num_layers=23,
    image_head_dim=64,
    image_mlp_dim=4096,
    image_mlp_activations="quick_gelu",
    image_num_pos=577,
    image_norm_eps=1e-5,
)
# The official `Activation.build` names → `layers.activation` names.
VIT_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu",
                   "silu": "silu"}
# VisionBackboneConfig fields that change nothing at inference.
_TRAINING_ONLY = ("image_dropout_rate", "attention_dropout", "residual_dropout", "initializer_range", "fsdp_wrap",
                  "resize_mode")
VIT_LAYERS = (-2, -9)  # hidden states (after each block) concatenated, in this order
POOLING = (2, 2)  # image_pooling_h, image_pooling_w
ADDITIONAL_VOCAB_SIZE = 128  # wte.new_embedding rows: ids embedding_size .. + 127


@dataclass(frozen=True)
class MolmoVisionConfig:
    image_default_input_size: tuple[int, int]
    image_patch_size: int
    image_pos_patch_size: int
    image_emb_dim: int
    image_num_heads: int
    image_num_key_value_heads: int
    image_num_layers: int
    image_head_dim: int
    image_mlp_dim: int
    image_mlp_activations: str
    image_num_pos: int
    image_norm_eps: float

    @property
    def num_patch(self) -> tuple[int, int]:
        """Patch grid of one crop (24 x 24 for ViT-L/14-336)."""
        h, w = self.image_default_input_size
        return h // self.image_patch_size, w // self.image_patch_size

    @property
    def patches_per_crop(self) -> int:
        return self.num_patch[0] * self.num_patch[1]

    @property
    def pooled_patch(self) -> tuple[int, int]:
        """Pooled grid of one crop: patches rounded up to whole 2x2 windows (12 x 12)."""
        (h, w), (ph, pw) = self.num_patch, POOLING
        return (h + ph - 1) // ph, (w + pw - 1) // pw

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """VIT_LAYERS as indices into the per-block hidden states [0, image_num_layers)."""
        n = self.image_num_layers
        for layer in VIT_LAYERS:
            if not -n <= layer < n:
                raise ValueError(f"vit layer {layer} is out of range for a {n}-layer vision tower")
        return tuple(layer % n for layer in VIT_LAYERS)

    def __post_init__(self) -> None:
        if self.image_mlp_activations not in VIT_ACTIVATIONS:
            raise ValueError(f"vision MLP activation {self.image_mlp_activations!r} is not supported; expected one "
                             f"of {sorted(VIT_ACTIVATIONS)}")
        if self.image_num_heads % self.image_num_key_value_heads:
            raise ValueError("image_num_heads must be a multiple of image_num_key_value_heads")
        if self.image_num_heads * self.image_head_dim != self.image_emb_dim:
            raise ValueError(
                f"image_num_heads * image_head_dim ({self.image_num_heads} * {self.image_head_dim}) must equal "
                f"image_emb_dim ({self.image_emb_dim})"
            )
        _ = self.feature_indices

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any] | None) -> MolmoVisionConfig:
        values = dict(VISION_DEFAULTS)
        known = {f.name for f in fields(cls)}
        for key, value in (overrides or {}).items():
            if key in known:
                values[key] = value
            elif key not in _TRAINING_ONLY:
                # The official patch sets any key as an attribute, which nothing then reads.
                logger.warning("config.json fixture_vision_backbone key %r is not a vision setting; ignored", key)
        values["image_default_input_size"] = tuple(int(s) for s in values["image_default_input_size"])
        return cls(**values)


@dataclass(frozen=True)
class MolmoModelConfig:
    vocab_size: int  # the tokenizer's base vocabulary (config.json vocab_size)
    embedding_size: int  # wte.embedding rows = logits columns
    hidden_size: int
    intermediate_size: int  # ff_proj rows: value (I/2) then gate (I/2)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope_theta: float
    layer_norm_eps: float
    qkv_bias: bool
    vision: MolmoVisionConfig
    checkpoint_dtype: str | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def total_embeddings(self) -> int:
        """Rows of the input embedding table: wte.embedding then wte.new_embedding."""
        return self.embedding_size + ADDITIONAL_VOCAB_SIZE

    @property
    def mlp_hidden(self) -> int:
        """Width after SwiGLU: ff_out's input (the activation halves ff_proj's output)."""
        return self.intermediate_size // 2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.intermediate_size % 2:
            raise ValueError("intermediate_size must be even (SwiGLU splits ff_proj in halves)")

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> MolmoModelConfig:
        # Settings the official code does not implement the way config.json could ask for: refuse
        # them rather than serve a different model.
        for key, expected in (("attention_layer_norm", False), ("norm_after", False), ("clip_qkv", None),
                              ("layer_norm_type", "rms"), ("weight_tying", False), ("use_position_ids", True)):
            if d.get(key, expected) != expected:
                raise ValueError(f"config.json {key}={d[key]!r} is not supported for Molmo (expected {expected!r})")
        heads = int(d.get("num_attention_heads", 32))
        vocab = int(d.get("vocab_size", 50304))
        embedding = d.get("embedding_size", 50304)
        dtype = d.get("torch_dtype", d.get("dtype"))
        return cls(
            vocab_size=vocab,
            embedding_size=int(embedding if embedding is not None else vocab),
            hidden_size=int(d.get("hidden_size", 4096)),
            intermediate_size=int(d.get("intermediate_size", 11008)),
            num_hidden_layers=int(d.get("num_hidden_layers", 32)),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            qkv_bias=bool(d.get("qkv_bias", False)),
            vision=MolmoVisionConfig.from_overrides(d.get("fixture_vision_backbone")),
            checkpoint_dtype=str(dtype) if dtype is not None else None,
        )

    def with_vision(self, **changes: Any) -> MolmoModelConfig:
        return replace(self, vision=replace(self.vision, **changes))
