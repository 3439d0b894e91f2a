"""Molmo configs (the published one, the fixtures' ViT override, refusals) and the tiny
checkpoint writer (`vlmserve make-tiny-model --family molmo`): the real on-disk layout."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from safetensors import safe_open

from vlmserve.models.loader import load_model, safetensors_files
from vlmserve.models.molmo.config import MolmoModelConfig
from vlmserve.models.registry import make_tiny_model
from tests.models.molmo.conftest import CHECKPOINT, golden_dir

# config.json of allenai/Molmo-7B-D-0924 (all keys but auto_map / transformers_version).
MOLMO_7B_D = {
    "architectures": ["MolmoForCausalLM"], "attention_layer_norm": False, "clip_qkv": None,
    "embedding_size": 152064, "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 37888,
    "layer_norm_eps": 1e-06, "layer_norm_type": "rms", "max_position_embeddings": 4096, "model_type": "molmo",
    "norm_after": False, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "qkv_bias": True, "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
    "use_cache": True, "use_position_ids": True, "vocab_size": 152064, "weight_tying": False,
}


def test_published_config_gets_the_hard_coded_vit_l():
    c = MolmoModelConfig.from_hf_config(MOLMO_7B_D)
    assert (c.head_dim, c.mlp_hidden, c.total_embeddings) == (128, 18944, 152064 + 128)
    v = c.vision
    assert (v.image_emb_dim, v.image_num_layers, v.image_num_heads, v.image_mlp_dim) == (1024, 23, 16, 4096)
    assert v.num_patch == (24, 24) and v.pooled_patch == (12, 12) and v.feature_indices == (21, 14)


def test_fixture_override_replaces_only_the_named_vit_sizes():
    c = MolmoModelConfig.from_hf_config(json.loads((golden_dir() / "checkpoint" / "config.json").read_text()))
    assert (c.vision.image_emb_dim, c.vision.image_num_layers, c.vision.feature_indices) == (32, 9, (7, 0))
    assert c.vision.image_num_pos == 577 and c.vision.image_mlp_activations == "quick_gelu"
    # As the official patch: keys it sets but nothing reads change nothing; real ones apply.
    other = MolmoModelConfig.from_hf_config(
        {**MOLMO_7B_D, "fixture_vision_backbone": {"image_width": 3, "image_mlp_activations": "gelu"}})
    assert other.vision.image_emb_dim == 1024 and other.vision.image_mlp_activations == "gelu"
    with pytest.raises(ValueError, match="vision MLP activation"):
        MolmoModelConfig.from_hf_config({**MOLMO_7B_D, "fixture_vision_backbone": {"image_mlp_activations": "x"}})


@pytest.mark.parametrize("key, value", [("norm_after", True), ("clip_qkv", 8.0), ("weight_tying", True),
                                        ("layer_norm_type", "default"), ("attention_layer_norm", True)])
def test_settings_the_official_model_would_build_differently_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        MolmoModelConfig.from_hf_config({**MOLMO_7B_D, key: value})


def _pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".{i}.", name)


def test_make_tiny_model_writes_the_published_layout(tmp_path):
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "vlmserve.cli", "make-tiny-model", "--family", "molmo", "--out", str(single)],
                   check=True, capture_output=True)
    out = make_tiny_model("molmo", tmp_path / "sharded", seed=0, sharded=True)
    with safe_open(str(single / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = safetensors_files(out)
    assert len(shards) == 2 and set(index["weight_map"].values()) == {s.name for s in shards}
    with safe_open(str(CHECKPOINT / "model.safetensors"), framework="pt") as f:
        golden_names = {_pattern(n) for n in f.keys()}
    assert {_pattern(n) for n in index["weight_map"]} == golden_names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MolmoForCausalLM"] and "fixture_vision_backbone" in config
    model, cfg = load_model(out, progress=False)
    assert cfg.embedding_size == 512 and model.kv_cache_spec.num_layers == 2
