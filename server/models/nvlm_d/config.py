"""NVLM-D dimensions, parsed once from a checkpoint's config.json (the remote-code
`NVLM_D_Config` layout: top-level tiling keys, `vision_config` in InternViT's format,
`llm_config` a Qwen2 config).

Every size is read from the checkpoint; nothing is assumed about NVLM-D-72B except the defaults
the official config classes give absent keys (`NVLM_D_Config`, `InternVisionConfig`).

The official code builds its Qwen2 with transformers 4.39's `Qwen2ForCausalLM`, whose rotary
ignores `rope_scaling` (NVLM-D-72B ships `{"type": "dynamic", "factor": 3.0}`): plain RoPE at
every length is what the reference computes, so that is what we compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmserve.models.layers.activation import check_activation


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ValueError(f"config.json: {where} is missing {key!r}")
    return d[key]


@dataclass(frozen=True)
class InternVisionConfig:
    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_hidden_layers: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    qk_normalization: bool = True
    qkv_bias: bool = False
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        """Patches per side of one tile."""
        return self.image_size // self.patch_size

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision_config.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision_config.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.num_channels != 3:
            raise ValueError(f"vision_config.num_channels must be 3 (RGB), got {self.num_channels}")
        check_activation(self.hidden_act, "vision_config.hidden_act")

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> InternVisionConfig:
        where = "vision_config"
        return cls(
            hidden_size=int(_require(d, "hidden_size", where)),
            num_attention_heads=int(_require(d, "num_attention_heads", where)),
            intermediate_size=int(_require(d, "intermediate_size", where)),
            num_hidden_layers=int(_require(d, "num_hidden_layers", where)),
            image_size=int(d.get("image_size", 224)),
            patch_size=int(d.get("patch_size", 14)),
            num_channels=int(d.get("num_channels", 3)),
            qk_normalization=bool(d.get("qk_normalization", False)),
            qkv_bias=bool(d.get("qkv_bias", False)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
            hidden_act=str(d.get("hidden_act", "gelu")),
        )


@dataclass(frozen=True)
class NVLMDModelConfig:
    # Language model (llm_config, a Qwen2 config).
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    vision: InternVisionConfig
    # Tiling and the vision -> LM bridge (top level).
    image_size: int  # tile side in pixels: force_image_size or vision_config.image_size
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    use_thumbnail: bool = False
    dynamic_image_size: bool = False
    downsample_ratio: float = 0.5
    ps_version: str = "v1"
    select_layer: int = -1
    template: str | None = None
    hidden_act: str = "silu"
    checkpoint_dtype: str | None = None
    eos_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def shuffle_factor(self) -> int:
        """Pixel shuffle folds factor x factor neighbouring patches into one token (2 for 0.5)."""
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """`num_image_token` of the official model: (grid * downsample_ratio) ** 2."""
        return int((self.image_size // self.vision.patch_size) ** 2 * self.downsample_ratio**2)

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers whose output `select_layer` picks (hidden_states[select_layer], where
        hidden_states[0] is the embeddings): the later layers need not run."""
        n = self.vision.num_hidden_layers
        return n + 1 + self.select_layer if self.select_layer < 0 else self.select_layer

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"llm_config.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"llm_config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        check_activation(self.hidden_act, "llm_config.hidden_act")
        if self.image_size != self.vision.image_size:
            # The official InternVisionEmbeddings adds its position table unresized: a tile must
            # be exactly the vision tower's image_size.
            raise ValueError(
                f"config.json force_image_size ({self.image_size}) differs from vision_config.image_size "
                f"({self.vision.image_size}); the official vision tower takes tiles of its image_size only"
            )
        f = self.shuffle_factor
        if abs(1 / f - self.downsample_ratio) > 1e-9 or self.vision.grid % f:
            raise ValueError(
                f"downsample_ratio {self.downsample_ratio} must be 1/k with k dividing the {self.vision.grid} "
                "patches per tile side"
            )
        if self.ps_version not in ("v1", "v2"):
            raise ValueError(f"config.json ps_version must be 'v1' or 'v2', got {self.ps_version!r}")
        if not 0 <= self.vision_layers_used <= self.vision.num_hidden_layers:
            raise ValueError(
                f"config.json select_layer {self.select_layer} is out of range for "
                f"{self.vision.num_hidden_layers} vision layers"
            )
        if self.max_dynamic_patch < 1:
            raise ValueError(f"config.json max_dynamic_patch must be at least 1, got {self.max_dynamic_patch}")
        if self.template not in (None, "chatml"):
            raise ValueError(f"config.json template {self.template!r} is not supported; NVLM-D uses 'chatml'")

    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> NVLMDModelConfig:
        llm = d.get("llm_config")
        vision = d.get("vision_config")
        if not isinstance(llm, dict) or not isinstance(vision, dict):
            raise ValueError("config.json needs llm_config and vision_config sections; is this an NVLM-D checkpoint?")
        arch = (llm.get("architectures") or [None])[0]
        if arch != "Qwen2ForCausalLM":
            raise ValueError(
                f"config.json llm_config.architectures[0] is {arch!r}; the official NVLM-D code (and we) "
                "support Qwen2ForCausalLM only"
            )
        where = "llm_config"
        num_heads = int(_require(llm, "num_attention_heads", where))
        vision_config = InternVisionConfig.from_hf_config(vision)
        dtype = d.get("torch_dtype") or llm.get("torch_dtype")
        eos = llm.get("eos_token_id")
        return cls(
            vocab_size=int(_require(llm, "vocab_size", where)),
            hidden_size=int(_require(llm, "hidden_size", where)),
            intermediate_size=int(_require(llm, "intermediate_size", where)),
            num_hidden_layers=int(_require(llm, "num_hidden_layers", where)),
            num_attention_heads=num_heads,
            num_key_value_heads=int(llm.get("num_key_value_heads") or num_heads),
            rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
            rope_theta=float(llm.get("rope_theta", 10000.0)),
            max_position_embeddings=int(llm.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
            vision=vision_config,
            image_size=int(d.get("force_image_size") or vision_config.image_size),
            min_dynamic_patch=int(d.get("min_dynamic_patch", 1)),
            max_dynamic_patch=int(d.get("max_dynamic_patch", 6)),
            use_thumbnail=bool(d.get("use_thumbnail", False)),
            dynamic_image_size=bool(d.get("dynamic_image_size", False)),
            downsample_ratio=float(d.get("downsample_ratio", 0.5)),
            ps_version=str(d.get("ps_version", "v1")),
            select_layer=int(d.get("select_layer", -1)),
            template=d.get("template"),
            hidden_act=str(llm.get("hidden_act", "silu")),
            checkpoint_dtype=str(dtype) if dtype is not None else None,
            eos_token_id=int(eos) if isinstance(eos, int) else None,
        )
