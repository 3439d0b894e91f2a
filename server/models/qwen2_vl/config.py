"""Qwen2-VL model dimensions, parsed once from a checkpoint's config.json.

Two on-disk layouts exist and both are accepted:
- the published one (Qwen/Qwen2-VL-*-Instruct on the hub): text keys at the top level,
  `rope_scaling: {"type": "mrope", "mrope_section": [...]}`, `rope_theta` at the top level,
  `vision_config` with `in_chans` (and `embed_dim`, `depth`, ...), `torch_dtype`;
- the transformers-5 one (`save_pretrained`): text keys nested under `text_config`, with
  `rope_parameters: {"rope_theta", "mrope_section", ...}`, `vision_config` with
  `in_channels`, `dtype`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmserve.models.layers.activation import check_activation
from vlmserve.models.layers.rotary import RopeScaling

# Defaults of the published checkpoints, used only when a key is absent.
_DEFAULT_VISION_ROPE_THETA = 10000.0
_DEFAULT_TEXT_ROPE_THETA = 1000000.0


@dataclass(frozen=True)
class Qwen2VLVisionModelConfig:
    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int  # the merger's output width: the language model's hidden size
    hidden_act: str = "quick_gelu"
    rope_theta: float = _DEFAULT_VISION_ROPE_THETA
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_input_dim(self) -> int:
        """Width of one row of `pixel_values`: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"vision_config.embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_dim % 4:
            # The 2-D rotary splits half the head dim between h and w, each in rotate-half pairs.
            raise ValueError(f"vision head_dim ({self.head_dim}) must be divisible by 4 for the 2-D rotary")
        check_activation(self.hidden_act, "vision_config.hidden_act")

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], out_hidden_size: int) -> Qwen2VLVisionModelConfig:
        rope = d.get("rope_parameters") or {}
        return cls(
            depth=int(_require(d, "depth", "vision_config")),
            embed_dim=int(_require(d, "embed_dim", "vision_config")),
            num_heads=int(_require(d, "num_heads", "vision_config")),
            mlp_ratio=float(d.get("mlp_ratio", 4)),
            in_channels=int(d.get("in_channels", d.get("in_chans", 3))),
            patch_size=int(d.get("patch_size", d.get("spatial_patch_size", 14))),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            spatial_merge_size=int(d.get("spatial_merge_size", 2)),
            out_hidden_size=int(d.get("hidden_size", out_hidden_size)),
            hidden_act=d.get("hidden_act", "quick_gelu"),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", _DEFAULT_VISION_ROPE_THETA))),
        )


@dataclass(frozen=True)
class Qwen2VLModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]  # frequency slots given to the (t, h, w) axes
    max_position_embeddings: int
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    tie_word_embeddings: bool
    vision: Qwen2VLVisionModelConfig
    checkpoint_dtype: str | None = None  # "bfloat16", "float16", "float32" or None if unset
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"  # the text MLP's gate activation
    rope_scaling: RopeScaling | None = None  # of the text M-RoPE's frequencies
    # Set when some decoder layer uses sliding-window attention (use_sliding_window, or
    # layer_types): we attend fully, which matches it only up to the window, so the engine
    # caps the context there (`vlmserve.engine.builder.context_length`).
    sliding_window: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section {list(self.mrope_section)} must have 3 entries summing to head_dim // 2 = "
                f"{self.head_dim // 2} (head_dim = hidden_size / num_attention_heads = {self.head_dim}); "
                "fix rope_scaling.mrope_section (or text_config.rope_parameters.mrope_section) in config.json"
            )
        check_activation(self.hidden_act, "hidden_act")
        if self.vision.out_hidden_size != self.hidden_size:
            raise ValueError(
                f"vision_config.hidden_size ({self.vision.out_hidden_size}) must equal the language model's "
                f"hidden_size ({self.hidden_size}): the merger's output replaces token embeddings"
            )

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> Qwen2VLModelConfig:
        """Parse a config.json dict in either layout (see the module docstring)."""
        text = d.get("text_config") or d  # published configs keep text keys at the top level
        rope = dict(text.get("rope_parameters") or {})
        rope.update(text.get("rope_scaling") or d.get("rope_scaling") or {})
        mrope_section = rope.get("mrope_section")
        if mrope_section is None:
            raise ValueError(
                "config.json has no mrope_section: expected rope_scaling.mrope_section (published layout) or "
                "text_config.rope_parameters.mrope_section (transformers-5 layout)"
            )
        rope_theta = rope.get("rope_theta", text.get("rope_theta", d.get("rope_theta", _DEFAULT_TEXT_ROPE_THETA)))
        hidden_size = int(_require(text, "hidden_size", "text config"))
        num_heads = int(_require(text, "num_attention_heads", "text config"))
        if "vision_config" not in d:
            raise ValueError("config.json has no vision_config; is this a Qwen2-VL checkpoint?")
        tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        dtype = d.get("torch_dtype", d.get("dtype")) or text.get("torch_dtype", text.get("dtype"))
        eos = text.get("eos_token_id", d.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(_require(text, "vocab_size", "text config")),
            hidden_size=hidden_size,
            intermediate_size=int(_require(text, "intermediate_size", "text config")),
            num_hidden_layers=int(_require(text, "num_hidden_layers", "text config")),
            num_attention_heads=num_heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or num_heads),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            mrope_section=tuple(int(x) for x in mrope_section),
            max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
            image_token_id=int(_first(d, text, "image_token_id", 151655)),
            video_token_id=int(_first(d, text, "video_token_id", 151656)),
            vision_start_token_id=int(_first(d, text, "vision_start_token_id", 151652)),
            vision_end_token_id=int(_first(d, text, "vision_end_token_id", 151653)),
            tie_word_embeddings=tie,
            vision=Qwen2VLVisionModelConfig.from_hf_config(d["vision_config"], hidden_size),
            checkpoint_dtype=str(dtype) if dtype is not None else None,
            bos_token_id=text.get("bos_token_id", d.get("bos_token_id")),
            eos_token_ids=eos_ids,
            hidden_act=str(text.get("hidden_act", "silu")),
            rope_scaling=RopeScaling.from_rope_parameters(rope, "text_config.rope_parameters"),
            sliding_window=_sliding_window(text),
        )


def _sliding_window(text: dict[str, Any]) -> int | None:
    """The window, if any layer slides: transformers' `layer_types` when saved, else its rule
    (with use_sliding_window, layers from max_window_layers on)."""
    window = text.get("sliding_window")
    layer_types = text.get("layer_types")
    if layer_types is not None:
        sliding = "sliding_attention" in layer_types
    else:
        num_layers = int(text.get("num_hidden_layers", 0))
        sliding = bool(text.get("use_sliding_window")) and int(text.get("max_window_layers", num_layers)) < num_layers
    return int(window) if sliding and window else None


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"config.json: {where} is missing {key!r}")
    return d[key]


def _first(root: dict[str, Any], text: dict[str, Any], key: str, default: int) -> Any:
    if key in root:
        return root[key]
    return text.get(key, default)
