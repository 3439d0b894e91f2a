"""Llama 3.2 Vision (Mllama) dimensions, parsed once from a checkpoint's config.json.

Both on-disk layouts are nested (`text_config`, `vision_config`); they differ in the text
RoPE keys and the dtype key:
- published (meta-llama/Llama-3.2-*-Vision-Instruct): `text_config.rope_theta` and
  `text_config.rope_scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
  "high_freq_factor", "original_max_position_embeddings"}`, `torch_dtype`;
- transformers-5 (`save_pretrained`): `text_config.rope_parameters` holding all of those
  (with `rope_theta`), `dtype`.
`image_token_index` (published) is `image_token_id` in some exports; both are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmserve.models.layers.activation import check_activation
from vlmserve.models.layers.rotary import RopeScaling

_DEFAULT_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
# transformers' defaults for absent (null) lists; an empty list is a real value (no layers).
_INTERMEDIATE = (3, 7, 15, 23, 30)
_CROSS_LAYERS = (3, 8, 13, 18, 23, 28, 33, 38)


@dataclass(frozen=True)
class MllamaVisionModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # local ("transformer") layers
    num_global_layers: int  # gated global layers
    num_heads: int
    image_size: int  # tile side in pixels (560 for the published checkpoints)
    patch_size: int
    max_num_tiles: int
    num_aspect_ratios: int  # len(supported_aspect_ratios): aspect-ratio ids run 1..this (0 = none)
    intermediate_layers_indices: tuple[int, ...]
    vision_output_dim: int
    num_channels: int = 3
    norm_eps: float = 1e-5
    hidden_act: str = "gelu"  # the encoder layers' MLP activation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per tile: the patch grid plus the class token (1601 for 560 / 14)."""
        return self.grid**2 + 1

    @property
    def padded_patches(self) -> int:
        """Tokens per tile inside the encoder: num_patches rounded up to a multiple of 8."""
        return -(-self.num_patches // 8) * 8

    @property
    def rows_per_image(self) -> int:
        """Cross-attention rows of one image: every tile slot, padded tiles included."""
        return self.max_num_tiles * self.num_patches

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by attention_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_patches % 8 == 0:
            # transformers pads each tile to a multiple of 8 and masks the pad with a slice
            # `[-pad:]`, which for pad == 0 marks every token as padding: no real checkpoint
            # has this, and reproducing it would mean uniform attention.
            raise ValueError(f"vision (image_size/patch_size)^2 + 1 = {self.num_patches} must not be a multiple of 8")
        check_activation(self.hidden_act, "vision_config.hidden_act")
        n = self.num_hidden_layers
        bad = [i for i in self.intermediate_layers_indices if not -n <= i < n]
        if bad or not self.intermediate_layers_indices:
            raise ValueError(
                f"vision_config.intermediate_layers_indices {list(self.intermediate_layers_indices)} must name at least "
                f"one of the {n} local layers (indices -{n} to {n - 1}, as transformers indexes their outputs)"
            )
        expected = self.hidden_size * (1 + len(self.intermediate_layers_indices))
        if self.vision_output_dim != expected:
            raise ValueError(
                f"vision_output_dim {self.vision_output_dim} must be hidden_size * (1 + number of intermediate "
                f"layers) = {expected}"
            )

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> MllamaVisionModelConfig:
        ratios = d.get("supported_aspect_ratios") or _DEFAULT_ASPECT_RATIOS
        return cls(
            hidden_size=int(d.get("hidden_size", 1280)),
            intermediate_size=int(d.get("intermediate_size", 5120)),
            num_hidden_layers=int(d.get("num_hidden_layers", 32)),
            num_global_layers=int(d.get("num_global_layers", 8)),
            num_heads=int(d.get("attention_heads", d.get("num_attention_heads", 16))),
            image_size=int(d.get("image_size", 448)),
            patch_size=int(d.get("patch_size", 14)),
            max_num_tiles=int(d.get("max_num_tiles", 4)),
            num_aspect_ratios=len(ratios),
            intermediate_layers_indices=tuple(int(i) for i in _default(d.get("intermediate_layers_indices"), _INTERMEDIATE)),
            vision_output_dim=int(d.get("vision_output_dim", 7680)),
            num_channels=int(d.get("num_channels", 3)),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            hidden_act=str(d.get("hidden_act", "gelu")),
        )


@dataclass(frozen=True)
class MllamaModelConfig:
    vocab_size: int  # lm_head rows; the input embedding has vocab_size + 8 rows
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # self-attention and cross-attention layers together
    num_attention_heads: int
    num_key_value_heads: int
    cross_attention_layers: tuple[int, ...]
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    image_token_id: int
    vision: MllamaVisionModelConfig
    checkpoint_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"  # the text MLP's gate activation

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_embeddings(self) -> int:
        return self.vocab_size + 8

    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if i not in self.cross_attention_layers)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"text hidden_size {self.hidden_size}, num_attention_heads {self.num_attention_heads} and "
                f"num_key_value_heads {self.num_key_value_heads} must divide evenly"
            )
        check_activation(self.hidden_act, "text_config.hidden_act")
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"cross_attention_layers {bad} outside the {self.num_hidden_layers} decoder layers")
        if not 0 <= self.image_token_id < self.num_embeddings:
            raise ValueError(f"image_token_index {self.image_token_id} outside the {self.num_embeddings} embeddings")

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> MllamaModelConfig:
        """Parse a config.json dict in either layout (see the module docstring)."""
        text, vision = d.get("text_config"), d.get("vision_config")
        if not isinstance(text, dict) or not isinstance(vision, dict):
            raise ValueError("config.json needs nested text_config and vision_config; is this an Mllama checkpoint?")
        rope = dict(text.get("rope_parameters") or {})
        rope.update(text.get("rope_scaling") or {})
        scaling = RopeScaling.from_rope_parameters(rope, "text_config.rope_parameters")
        heads = int(_require(text, "num_attention_heads"))
        dtype = d.get("torch_dtype", d.get("dtype")) or text.get("torch_dtype", text.get("dtype"))
        eos = text.get("eos_token_id", d.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(_require(text, "vocab_size")),
            hidden_size=int(_require(text, "hidden_size")),
            intermediate_size=int(_require(text, "intermediate_size")),
            num_hidden_layers=int(_require(text, "num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            cross_attention_layers=tuple(int(i) for i in _default(text.get("cross_attention_layers"), _CROSS_LAYERS)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 500000.0))),
            rope_scaling=scaling,
            max_position_embeddings=int(text.get("max_position_embeddings", 131072)),
            image_token_id=int(d.get("image_token_index", d.get("image_token_id", 128256))),
            vision=MllamaVisionModelConfig.from_hf_config(vision),
            checkpoint_dtype=str(dtype) if dtype is not None else None,
            bos_token_id=text.get("bos_token_id", d.get("bos_token_id")),
            eos_token_ids=eos_ids,
            hidden_act=str(text.get("hidden_act", "silu")),
        )


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _require(d: dict[str, Any], key: str) -> Any:
    if key not in d:
        raise ValueError(f"config.json: text_config is missing {key!r}")
    return d[key]
