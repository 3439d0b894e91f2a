"""HF architecture name (config.json `architectures[0]`) → the family that serves it.

Model and processor classes are named by import path and imported on first use, so the
registry imports no family code (and no torch-heavy module) until a family is picked.
Several families may share one architecture name (Pixtral is `LlavaForConditionalGeneration`
with a Pixtral vision tower): each then supplies `accepts(config)` to claim its checkpoints.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


def _import(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"cannot import {path}: {e}") from e


@dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple[str, ...]
    config_class_path: str  # a class with `from_hf_config(config_json: dict)`
    model_class_path: str  # constructed as cls(model_config, dtype, device); implements VLModel
    processor_class_path: str
    accepts: Callable[[dict[str, Any]], bool] | None = None  # needed when architectures overlap

    def parse_config(self, hf_config: dict[str, Any]) -> Any:
        return _import(self.config_class_path).from_hf_config(hf_config)

    def model_class(self) -> type:
        return _import(self.model_class_path)

    def processor_class(self) -> type:
        return _import(self.processor_class_path)


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        name="qwen2_vl",
        architectures=("Qwen2VLForConditionalGeneration",),
        config_class_path="vlmserve.models.qwen2_vl.config.Qwen2VLModelConfig",
        model_class_path="vlmserve.models.qwen2_vl.model.Qwen2VLForConditionalGeneration",
        processor_class_path="vlmserve.models.qwen2_vl.processor.Qwen2VLProcessor",
    ),
    ModelFamily(
        name="pixtral",
        # "PixtralForConditionalGeneration": the name the loader gives a Mistral-format
        # checkpoint (params.json with a vision_encoder section; see loader.read_hf_config).
        architectures=("LlavaForConditionalGeneration", "PixtralForConditionalGeneration"),
        config_class_path="vlmserve.models.pixtral.config.PixtralModelConfig",
        model_class_path="vlmserve.models.pixtral.model.PixtralForConditionalGeneration",
        processor_class_path="vlmserve.models.pixtral.processor.PixtralProcessor",
        accepts=lambda cfg: "mistral_params" in cfg or (cfg.get("vision_config") or {}).get("model_type") == "pixtral",
    ),
    ModelFamily(
        name="mllama",
        architectures=("MllamaForConditionalGeneration",),
        config_class_path="vlmserve.models.mllama.config.MllamaModelConfig",
        model_class_path="vlmserve.models.mllama.model.MllamaForConditionalGeneration",
        processor_class_path="vlmserve.models.mllama.processor.MllamaProcessor",
    ),
    ModelFamily(
        name="nvlm_d",
        architectures=("NVLM_D",),
        config_class_path="vlmserve.models.nvlm_d.config.NVLMDModelConfig",
        model_class_path="vlmserve.models.nvlm_d.model.NVLMDForCausalLM",
        processor_class_path="vlmserve.models.nvlm_d.processor.NVLMDProcessor",
    ),
    ModelFamily(
        name="molmo",
        architectures=("MolmoForCausalLM",),
        config_class_path="vlmserve.models.molmo.config.MolmoModelConfig",
        model_class_path="vlmserve.models.molmo.model.MolmoForCausalLM",
        processor_class_path="vlmserve.models.molmo.processor.MolmoProcessor",
    ),
)

# family name -> import path of its tiny-checkpoint writer `(out_dir, seed=..., **kw) -> Path`.
TINY_MAKERS: dict[str, str] = {
    "qwen2_vl": "vlmserve.models.qwen2_vl.tiny.make_tiny_qwen2_vl",
    "pixtral": "vlmserve.models.pixtral.tiny.make_tiny_pixtral",
    "mllama": "vlmserve.models.mllama.tiny.make_tiny_mllama",
    "nvlm_d": "vlmserve.models.nvlm_d.tiny.make_tiny_nvlm_d",
    "molmo": "vlmserve.models.molmo.tiny.make_tiny_molmo",
}


def make_tiny_model(family: str, out_dir: Any, seed: int = 0, **kwargs: Any) -> Any:
    """Write a tiny random-weight checkpoint of `family` into `out_dir`; family-specific options
    (Pixtral's `format="hf" | "mistral"`) pass through `kwargs`. Returns the directory."""
    if family not in TINY_MAKERS:
        raise ValueError(f"no tiny model for family {family!r}; known: {', '.join(sorted(TINY_MAKERS))}")
    return _import(TINY_MAKERS[family])(out_dir, seed=seed, **kwargs)


def supported_architectures() -> list[str]:
    return sorted({arch for family in FAMILIES for arch in family.architectures})


def family_for_config(hf_config: dict[str, Any]) -> ModelFamily:
    """The family serving a checkpoint, from its parsed config.json."""
    architectures = hf_config.get("architectures") or []
    if not architectures:
        raise ValueError(
            "config.json has no 'architectures' entry, so the model family is unknown; supported: "
            + ", ".join(supported_architectures())
        )
    arch = architectures[0]
    candidates = [f for f in FAMILIES if arch in f.architectures]
    if not candidates:
        raise ValueError(
            f"unsupported model architecture {arch!r}; supported: {', '.join(supported_architectures())}"
        )
    for family in candidates:
        if family.accepts is None or family.accepts(hf_config):
            return family
    raise ValueError(
        f"architecture {arch!r} is known, but no family accepts this checkpoint's config "
        f"(tried {', '.join(f.name for f in candidates)})"
    )


def family_by_name(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
