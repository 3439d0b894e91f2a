"""Config parsing (published 11B / 90B layouts, transformers-5 layout) and loading the
transformers-5 weight names."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding

from vlmserve.models.mllama.config import MllamaModelConfig
from vlmserve.models.layers.rotary import scaled_rope_inv_freq
from vlmserve.models.mllama.model import MllamaForConditionalGeneration

VISION_11B = {
    "attention_heads": 16, "hidden_act": "gelu", "hidden_size": 1280, "image_size": 560,
    "intermediate_layers_indices": [3, 7, 15, 23, 30], "intermediate_size": 5120, "max_num_tiles": 4,
    "norm_eps": 1e-05, "num_channels": 3, "num_global_layers": 8, "num_hidden_layers": 32, "patch_size": 14,
    "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
    "vision_output_dim": 7680,
}
ROPE = {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def published(hidden, layers, heads, inter, cross):
    return {
        "architectures": ["MllamaForConditionalGeneration"], "image_token_index": 128256, "torch_dtype": "bfloat16",
        "text_config": {"cross_attention_layers": cross, "hidden_size": hidden, "intermediate_size": inter,
                        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": 8,
                        "rope_scaling": ROPE, "rope_theta": 500000.0, "vocab_size": 128256,
                        "eos_token_id": [128001, 128008, 128009], "rms_norm_eps": 1e-05},
        "vision_config": VISION_11B,
    }


def test_published_11b_and_90b_configs_parse_to_their_sizes() -> None:
    c11 = MllamaModelConfig.from_hf_config(published(4096, 40, 32, 14336, list(range(3, 40, 5))))
    c90 = MllamaModelConfig.from_hf_config(published(8192, 100, 64, 28672, list(range(3, 100, 5))))
    assert (len(c11.self_attention_layers), len(c11.cross_attention_layers), c11.head_dim) == (32, 8, 128)
    assert (len(c90.self_attention_layers), len(c90.cross_attention_layers), c90.head_dim) == (80, 20, 128)
    assert c11.vision.num_patches == 1601 and c11.vision.padded_patches == 1608
    assert c11.vision.rows_per_image == 6404 and c11.num_embeddings == 128264
    assert c11.rope_scaling.factor == 8.0 and c11.eos_token_ids == (128001, 128008, 128009)


def test_transformers5_rope_parameters_layout_parses_the_same() -> None:
    pub = published(4096, 40, 32, 14336, [3, 8])
    t5 = published(4096, 40, 32, 14336, [3, 8])
    text = t5["text_config"]
    text["rope_parameters"] = dict(ROPE, rope_theta=text.pop("rope_theta"))
    del text["rope_scaling"]
    t5["dtype"] = t5.pop("torch_dtype")
    assert MllamaModelConfig.from_hf_config(t5) == MllamaModelConfig.from_hf_config(pub)


def test_llama3_inv_freq_equals_transformers(mllama_models) -> None:
    model, hf = mllama_models
    ours = scaled_rope_inv_freq(model.config.head_dim, model.config.rope_theta, model.config.rope_scaling, "cpu")
    expected = MllamaRotaryEmbedding(hf.config.text_config).inv_freq
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)
    assert not torch.equal(ours, 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16))  # scaling is applied


@torch.inference_mode()
def test_transformers5_module_names_load_to_the_same_weights(mllama_models) -> None:
    """transformers 5 names its modules `model.language_model.*`, `model.vision_model.*`,
    `lm_head.*` (its save_pretrained converts back to the published names, which the fixture
    checkpoint uses); the loader takes both."""
    ours, hf = mllama_models
    state = hf.state_dict()
    assert any(n.startswith("model.language_model.layers.") for n in state)
    fresh = MllamaForConditionalGeneration(ours.config, torch.float32, "cpu")
    fresh.load_weights(state.items())
    for (name, a), (_, b) in zip(ours.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name


def test_missing_weights_are_named(mllama_models) -> None:
    ours, hf = mllama_models
    state = {k: v for k, v in hf.state_dict().items() if "cross_attn_mlp_gate" not in k}
    fresh = MllamaForConditionalGeneration(ours.config, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cross_attn_mlp_gate"):
        fresh.load_weights(state.items())
