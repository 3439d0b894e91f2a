"""Loading checkpoints: both config and weight layouts, sharding, tying, and loud failures."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vlmserve.models.loader import iter_safetensors, load_model, resolve_dtype, resolve_model_dir
from vlmserve.models.qwen2_vl.config import Qwen2VLModelConfig
from vlmserve.models.registry import family_for_config, supported_architectures


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(ckpt, progress=False))


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def _flat_published_config(nested: dict) -> dict:
    """The same model described in the published (pre-transformers-5) config layout."""
    text, vision = nested["text_config"], nested["vision_config"]
    rope = text["rope_parameters"]
    flat = {k: v for k, v in text.items() if k not in ("rope_parameters", "model_type", "dtype")}
    flat.update(
        architectures=nested["architectures"],
        model_type="qwen2_vl",
        torch_dtype="float32",
        rope_theta=rope["rope_theta"],
        rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
        tie_word_embeddings=nested["tie_word_embeddings"],
        vision_config={
            "depth": vision["depth"],
            "embed_dim": vision["embed_dim"],
            "mlp_ratio": vision["mlp_ratio"],
            "num_heads": vision["num_heads"],
            "in_chans": vision["in_channels"],
            "hidden_size": vision["hidden_size"],
            "patch_size": vision["patch_size"],
            "spatial_merge_size": vision["spatial_merge_size"],
            "spatial_patch_size": vision["patch_size"],
            "temporal_patch_size": vision["temporal_patch_size"],
        },
    )
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        flat[key] = nested[key]
    return flat


def _to_transformers5_name(name: str) -> str:
    if name.startswith("visual."):
        return "model." + name
    if name.startswith("model."):
        return "model.language_model." + name[len("model.") :]
    return name


def test_published_and_transformers5_layouts_load_identical_parameters(make_hf_tiny, tmp_path: Path) -> None:
    saved = make_hf_tiny(seed=0)  # nested config, published weight names
    weights = _tensors(saved)
    assert "model.layers.0.self_attn.q_proj.weight" in weights

    t5 = _copy_without_weights(saved, tmp_path / "t5_names")
    save_file({_to_transformers5_name(k): v for k, v in weights.items()}, str(t5 / "model.safetensors"))

    # Flat config, weights split into two shards with an index.
    flat = tmp_path / "flat_sharded"
    flat.mkdir()
    nested_config = json.loads((saved / "config.json").read_text())
    (flat / "config.json").write_text(json.dumps(_flat_published_config(nested_config)))
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(flat / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (flat / "model.safetensors.index.json").write_text(json.dumps(index))

    models = [load_model(d, dtype=torch.float32, progress=False) for d in (saved, t5, flat)]

    configs = [cfg for _, cfg in models]
    assert configs[0] == configs[1] == configs[2]
    reference = models[0][0].state_dict()
    for model, _ in models[1:]:
        other = model.state_dict()
        assert other.keys() == reference.keys()
        for k in reference:
            torch.testing.assert_close(other[k], reference[k], rtol=0, atol=0)
    # Fused at load time: q, k, v rows in order; gate then up; the Conv3d kernel flattened.
    layer = "language_model.layers.1."
    torch.testing.assert_close(
        reference[layer + "self_attn.qkv_proj.bias"],
        torch.cat([weights[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"]),
    )
    torch.testing.assert_close(
        reference[layer + "mlp.gate_up_proj.weight"],
        torch.cat([weights["model.layers.1.mlp.gate_proj.weight"], weights["model.layers.1.mlp.up_proj.weight"]]),
    )
    torch.testing.assert_close(
        reference["visual.patch_embed.weight"], weights["visual.patch_embed.proj.weight"].flatten(1)
    )


def test_missing_weight_is_named_in_the_error(make_hf_tiny, tmp_path: Path) -> None:
    saved = make_hf_tiny(seed=0)
    weights = _tensors(saved)
    del weights["model.layers.1.self_attn.k_proj.bias"]
    del weights["visual.merger.ln_q.weight"]
    broken = _copy_without_weights(saved, tmp_path / "broken")
    save_file(weights, str(broken / "model.safetensors"))

    with pytest.raises(ValueError, match="missing weights") as err:
        load_model(broken, dtype=torch.float32, progress=False)
    assert "language_model.layers.1.self_attn.qkv_proj.bias (k_proj)" in str(err.value)
    assert "visual.merger.ln_q.weight" in str(err.value)


def test_unexpected_weight_is_named_in_the_error(make_hf_tiny, tmp_path: Path) -> None:
    saved = make_hf_tiny(seed=0)
    weights = _tensors(saved)
    weights["model.layers.7.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    weights["mystery.tensor"] = torch.zeros(3)
    broken = _copy_without_weights(saved, tmp_path / "extra")
    save_file(weights, str(broken / "model.safetensors"))

    with pytest.raises(ValueError, match="unexpected weights") as err:
        load_model(broken, dtype=torch.float32, progress=False)
    assert "model.layers.7.self_attn.q_proj.weight" in str(err.value)
    assert "mystery.tensor" in str(err.value)


def test_wrong_shape_names_the_tensor_and_both_shapes(make_hf_tiny, tmp_path: Path) -> None:
    saved = make_hf_tiny(seed=0)
    weights = _tensors(saved)
    weights["model.norm.weight"] = torch.ones(65)
    broken = _copy_without_weights(saved, tmp_path / "shape")
    save_file(weights, str(broken / "model.safetensors"))

    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(65,\).*\(64,\)"):
        load_model(broken, dtype=torch.float32, progress=False)


@torch.inference_mode()
def test_tied_checkpoint_projects_logits_with_the_input_embeddings(make_hf_tiny) -> None:
    saved = make_hf_tiny(seed=1, tie_word_embeddings=True)
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()

    model, cfg = load_model(saved, dtype=torch.float32, progress=False)

    assert cfg.tie_word_embeddings and model.lm_head is None
    hidden = torch.randn(5, cfg.hidden_size)
    expected = hidden @ model.language_model.embed_tokens.weight.T
    torch.testing.assert_close(model.compute_logits(hidden), expected)


def test_missing_lm_head_without_tie_flag_ties_with_a_warning(make_hf_tiny, tmp_path: Path, caplog) -> None:
    saved = make_hf_tiny(seed=0)
    weights = _tensors(saved)
    del weights["lm_head.weight"]
    ckpt = _copy_without_weights(saved, tmp_path / "no_head")
    save_file(weights, str(ckpt / "model.safetensors"))

    with caplog.at_level(logging.WARNING):
        model, _ = load_model(ckpt, dtype=torch.float32, progress=False)

    assert model.lm_head is None
    assert "no lm_head.weight" in caplog.text


def test_dtype_override_casts_every_parameter(make_hf_tiny) -> None:
    model, cfg = load_model(make_hf_tiny(seed=0), dtype="bfloat16", progress=False)
    assert cfg.checkpoint_dtype == "float32"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_auto_dtype_is_float32_on_cpu_and_the_checkpoint_dtype_elsewhere() -> None:
    assert resolve_dtype("auto", "bfloat16", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", "float16", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", None, torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("fp8", None, torch.device("cpu"))


def test_mrope_section_not_summing_to_half_head_dim_is_rejected(make_hf_tiny) -> None:
    config = json.loads((make_hf_tiny(seed=0) / "config.json").read_text())
    config["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 4]
    with pytest.raises(ValueError, match=r"must have 3 entries summing to head_dim // 2 = 8"):
        Qwen2VLModelConfig.from_hf_config(config)


def test_qwen2_vl_sliding_window_layers_cap_the_context(make_hf_tiny) -> None:
    from vlmserve.engine.builder import context_length

    config = json.loads((make_hf_tiny(seed=0) / "config.json").read_text())
    text = config["text_config"]
    text.pop("layer_types", None)
    text.update(use_sliding_window=False, sliding_window=64, max_window_layers=0)
    assert Qwen2VLModelConfig.from_hf_config(config).sliding_window is None  # the published default
    text.update(use_sliding_window=True)
    cfg = Qwen2VLModelConfig.from_hf_config(config)
    assert cfg.sliding_window == 64 and context_length(None, cfg) == 64
    text["layer_types"] = ["full_attention"] * text["num_hidden_layers"]  # saved by transformers: it wins
    assert Qwen2VLModelConfig.from_hf_config(config).sliding_window is None


def test_unknown_architecture_lists_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="unsupported model architecture 'GPT2LMHeadModel'") as err:
        family_for_config({"architectures": ["GPT2LMHeadModel"]})
    assert "Qwen2VLForConditionalGeneration" in str(err.value)
    assert family_for_config({"architectures": ["Qwen2VLForConditionalGeneration"]}).name == "qwen2_vl"
    assert "Qwen2VLForConditionalGeneration" in supported_architectures()


def test_local_directory_resolves_to_itself_and_an_unreachable_repo_id_fails_clearly(tmp_path: Path) -> None:
    assert resolve_model_dir(tmp_path) == tmp_path
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        resolve_model_dir(tmp_path / "absent" / "deeper")
    # No hub here (and in CI the repo does not exist): either way the error says what to do.
    with pytest.raises(FileNotFoundError, match="pass a local checkpoint directory"):
        resolve_model_dir("vlmserve-tests-nobody/no-such-model")


def test_directory_without_safetensors_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only the safetensors format is supported"):
        list(iter_safetensors(tmp_path))
