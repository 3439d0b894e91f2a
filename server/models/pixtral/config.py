"""Pixtral model dimensions, parsed once from a checkpoint's configuration.

Three on-disk layouts are accepted:
- the published Hugging Face one (`mistral-community/pixtral-12b`): `LlavaForConditionalGeneration`
  with a `text_config` (Mistral) and a `vision_config` (`model_type: "pixtral"`) that both
  omit keys equal to the transformers class defaults (e.g. `num_attention_heads`), and
  `rope_theta` as a plain key;
- the transformers-5 one (`save_pretrained`): the same, with `rope_parameters` dicts;
- the Mistral one (`mistralai/Pixtral-12B-2409`): `params.json`, see `mistral_format.py`,
  which the loader hands over as `{"architectures": [...], "mistral_params": {...}}`.

Missing keys take the defaults of transformers' `MistralConfig` / `PixtralVisionConfig` /
`LlavaConfig`, so a config parses to what transformers would build from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmserve.models.layers.activation import check_activation
from vlmserve.models.layers.rotary import RopeScaling

# transformers' class defaults (MistralConfig, PixtralVisionConfig, LlavaConfig).
_TEXT_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=4096 * 32,
)
_VISION_DEFAULTS = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_channels=3,
    image_size=1024,
    patch_size=16,
    hidden_act="gelu",
    rope_theta=10000.0,
)
_MISTRAL_SLIDING_WINDOW = 4096  # MistralConfig's default; Pixtral-12B's config sets null
# The published tokenizer's ids (Tekken: special tokens first).
IMAGE_TOKEN_ID, IMAGE_BREAK_TOKEN_ID, IMAGE_END_TOKEN_ID = 10, 12, 13


@dataclass(frozen=True)
class PixtralVisionModelConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int  # the longest image side the processor lets through, in pixels
    patch_size: int
    hidden_act: str
    rope_theta: float
    rms_norm_eps: float = 1e-5  # ln_pre and the layer norms: fixed in both implementations

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_input_dim(self) -> int:
        """Width of one flattened patch: C * P * P, in Conv2d weight order (c, row, col)."""
        return self.num_channels * self.patch_size**2

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 4:
            # The 2-D RoPE gives a quarter of the head dim to rows and a quarter to columns.
            raise ValueError(f"vision head_dim ({self.head_dim}) must be divisible by 4 for the 2-D RoPE")
        check_activation(self.hidden_act, "vision_config.hidden_act")  # the vision MLP's gate

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> PixtralVisionModelConfig:
        v = {**_VISION_DEFAULTS, **{k: d[k] for k in _VISION_DEFAULTS if d.get(k) is not None}}
        rope = d.get("rope_parameters") or {}
        heads = int(v["num_attention_heads"])
        head_dim = d.get("head_dim")
        if head_dim is not None and int(head_dim) != int(v["hidden_size"]) // heads:
            # transformers recomputes head_dim as hidden/heads and ignores the key.
            raise ValueError(f"vision_config.head_dim {head_dim} differs from hidden_size / num_attention_heads")
        return cls(
            hidden_size=int(v["hidden_size"]),
            intermediate_size=int(v["intermediate_size"]),
            num_hidden_layers=int(v["num_hidden_layers"]),
            num_attention_heads=heads,
            num_channels=int(v["num_channels"]),
            image_size=_side(v["image_size"]),
            patch_size=_side(v["patch_size"]),
            hidden_act=str(v["hidden_act"]),
            rope_theta=float(rope.get("rope_theta", v["rope_theta"])),
        )


@dataclass(frozen=True)
class PixtralModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # given explicitly by Pixtral-12B (128 != 5120 / 32)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    vision: PixtralVisionModelConfig
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    # Indices into the vision tower's hidden states [after ln_pre, after layer 1, ..., after
    # layer N]; -1 (Pixtral) is the last layer's output. Several: their features are
    # concatenated in this order, and the projector takes E * len(...) inputs.
    vision_feature_layers: tuple[int, ...] = (-1,)
    hidden_act: str = "silu"  # the text MLP's gate activation
    # Mistral's sliding-window attention span (token i sees i - window < j <= i); None: full.
    sliding_window: int | None = None
    rope_scaling: RopeScaling | None = None  # of the text RoPE's frequencies
    image_token_id: int = IMAGE_TOKEN_ID
    image_break_token_id: int = IMAGE_BREAK_TOKEN_ID
    image_end_token_id: int = IMAGE_END_TOKEN_ID
    checkpoint_dtype: str | None = None
    weight_format: str = "hf"  # "hf" | "mistral" (consolidated.safetensors names)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def vision_feature_indices(self) -> tuple[int, ...]:
        """`vision_feature_layers` as non-negative indices into the hidden states."""
        n = self.vision.num_hidden_layers + 1
        for layer in self.vision_feature_layers:
            if not -n <= layer < n:
                raise ValueError(f"vision_feature_layer {layer} is out of range for {n - 1} vision layers")
        return tuple(layer % n for layer in self.vision_feature_layers)

    @property
    def vision_layers_used(self) -> int:
        """Vision layers whose output the projector reads (the rest need not run)."""
        return max(self.vision_feature_indices)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        check_activation(self.projector_hidden_act, "projector_hidden_act")
        check_activation(self.hidden_act, "text_config.hidden_act")
        if not self.vision_feature_layers:
            raise ValueError("vision_feature_layer must name at least one vision layer")
        _ = self.vision_feature_indices  # range check
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"text_config.sliding_window must be positive or null, got {self.sliding_window}")

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> PixtralModelConfig:
        """Parse config.json (either HF layout) or the loader's wrapper of params.json."""
        if "mistral_params" in d:
            return config_from_params(d["mistral_params"])
        vision = d.get("vision_config") or {}
        if vision.get("model_type") != "pixtral":
            raise ValueError(
                f"config.json vision_config.model_type is {vision.get('model_type')!r}; the Pixtral family serves "
                "Llava checkpoints with a Pixtral vision tower only"
            )
        if d.get("vision_feature_select_strategy", "default") != "full":
            raise ValueError(
                "config.json must set vision_feature_select_strategy 'full' (Pixtral has no CLS token to drop)"
            )
        layer = d.get("vision_feature_layer", -2)
        layers = tuple(layer) if isinstance(layer, (list, tuple)) else (layer,)
        if not all(isinstance(i, int) for i in layers):
            raise ValueError(f"vision_feature_layer must be a layer index or a list of them, got {layer!r}")
        text = d.get("text_config") or {}
        t = {**_TEXT_DEFAULTS, **{k: text[k] for k in _TEXT_DEFAULTS if text.get(k) is not None}}
        rope = dict(text.get("rope_parameters") or {})
        rope.update(text.get("rope_scaling") or {})
        heads = int(t["num_attention_heads"])
        window = text.get("sliding_window", _MISTRAL_SLIDING_WINDOW)  # absent: MistralConfig's default
        tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
        dtype = d.get("torch_dtype", d.get("dtype")) or text.get("torch_dtype", text.get("dtype"))
        eos = text.get("eos_token_id", d.get("eos_token_id", 2))
        return cls(
            vocab_size=int(t["vocab_size"]),
            hidden_size=int(t["hidden_size"]),
            intermediate_size=int(t["intermediate_size"]),
            num_hidden_layers=int(t["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(t["num_key_value_heads"] or heads),
            head_dim=int(text.get("head_dim") or int(t["hidden_size"]) // heads),
            rms_norm_eps=float(t["rms_norm_eps"]),
            rope_theta=float(rope.get("rope_theta", t["rope_theta"])),
            max_position_embeddings=int(t["max_position_embeddings"]),
            tie_word_embeddings=tie,
            vision=PixtralVisionModelConfig.from_hf_config(vision),
            projector_hidden_act=str(d.get("projector_hidden_act", "gelu")),
            projector_bias=bool(d.get("multimodal_projector_bias", True)),
            vision_feature_layers=layers,
            hidden_act=str(text.get("hidden_act", "silu")),
            sliding_window=None if window is None else int(window),
            rope_scaling=RopeScaling.from_rope_parameters(rope, "text_config.rope_parameters"),
            image_token_id=int(d.get("image_token_index", d.get("image_token_id", IMAGE_TOKEN_ID))),
            checkpoint_dtype=str(dtype) if dtype is not None else None,
            bos_token_id=text.get("bos_token_id", d.get("bos_token_id", 1)),
            eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),)),
        )


def _side(value: Any) -> int:
    """An int, or a square [h, w] pair (transformers allows both)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"non-square sizes are not supported for Pixtral, got {value}")
        value = value[0]
    return int(value)


_DEFAULT_MAX_POSITIONS = 131072  # Pixtral-12B's 128k context; params.json does not state it


def config_from_params(params: dict[str, Any]) -> PixtralModelConfig:
    """The Mistral format's params.json (its `vision_encoder` section included) as our config."""
    v = params.get("vision_encoder")
    if not v:
        raise ValueError("params.json has no vision_encoder section: only Mistral-format Pixtral is supported")
    for key in ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size"):
        if key not in params:
            raise ValueError(f"params.json is missing {key!r}")
    if v.get("spatial_merge_size", 1) != 1 or v.get("add_pre_mm_projector_layer_norm"):
        raise ValueError("params.json describes a patch-merging vision encoder (Mistral Small 3.1); not supported")
    heads = int(params["n_heads"])
    return PixtralModelConfig(
        vocab_size=int(params["vocab_size"]),
        hidden_size=int(params["dim"]),
        intermediate_size=int(params["hidden_dim"]),
        num_hidden_layers=int(params["n_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(params.get("n_kv_heads") or heads),
        head_dim=int(params.get("head_dim") or int(params["dim"]) // heads),
        rms_norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta") or 10000.0),
        max_position_embeddings=int(params.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS),
        tie_word_embeddings=bool(params.get("tied_embeddings", False)),
        vision=PixtralVisionModelConfig(
            hidden_size=int(v["hidden_size"]),
            intermediate_size=int(v["intermediate_size"]),
            num_hidden_layers=int(v["num_hidden_layers"]),
            num_attention_heads=int(v["num_attention_heads"]),
            num_channels=int(v.get("num_channels", 3)),
            image_size=int(v.get("max_image_size") or v["image_size"]),
            patch_size=int(v["patch_size"]),
            hidden_act="silu",
            rope_theta=float(v.get("rope_theta", 10000.0)),
        ),
        projector_bias=bool(v.get("adapter_bias", True)),
        vision_feature_layers=(-1,),
        image_token_id=int(v.get("image_token_id", 10)),
        image_break_token_id=int(v.get("image_break_token_id", 12)),
        image_end_token_id=int(v.get("image_end_token_id", 13)),
        checkpoint_dtype=None,  # params.json names none; the loader then picks bfloat16 off the CPU
        weight_format="mistral",
        bos_token_id=1,
        eos_token_ids=(2,),
    )
