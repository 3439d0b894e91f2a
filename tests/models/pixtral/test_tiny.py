"""The tiny Pixtral checkpoints: real on-disk layouts, recognised by the loader and registry,
written by `vlmserve make-tiny-model --family pixtral [--format hf|mistral]`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlmserve.cli import main as cli_main
from vlmserve.models.loader import read_hf_config
from vlmserve.models.registry import family_for_config, make_tiny_model

HF_FILES = {"config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
MISTRAL_FILES = {"params.json", "consolidated.safetensors", "tekken.json"}


def _names(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_both_formats_have_the_published_files_and_weight_names(tiny_hf: Path, tiny_mistral: Path) -> None:
    assert {p.name for p in tiny_hf.iterdir()} == HF_FILES
    assert {p.name for p in tiny_mistral.iterdir()} == MISTRAL_FILES
    hf = _names(tiny_hf / "model.safetensors")
    mistral = _names(tiny_mistral / "consolidated.safetensors")
    assert {"vision_tower.patch_conv.weight", "multi_modal_projector.linear_1.bias",
            "language_model.model.layers.1.self_attn.q_proj.weight", "language_model.lm_head.weight"} <= hf
    assert {"vision_encoder.patch_conv.weight", "vision_encoder.transformer.layers.0.attention.wq.weight",
            "vision_language_adapter.w_in.bias", "layers.1.feed_forward.w3.weight", "tok_embeddings.weight",
            "output.weight", "norm.weight"} <= mistral
    assert len(hf) == len(mistral)
    assert (tiny_mistral / "tekken.json").stat().st_size < 200_000  # not the 19 MB real file


def test_loader_and_registry_map_both_formats_to_the_pixtral_family(tiny_hf: Path, tiny_mistral: Path) -> None:
    hf_cfg, mistral_cfg = read_hf_config(tiny_hf), read_hf_config(tiny_mistral)
    assert family_for_config(hf_cfg).name == family_for_config(mistral_cfg).name == "pixtral"
    assert family_for_config(mistral_cfg).parse_config(mistral_cfg).head_dim == 32  # explicit, != 64 / 4
    qwen_like = dict(hf_cfg, vision_config={"model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="no family accepts"):
        family_for_config(qwen_like)


def test_mistral_q_k_rows_are_stored_interleaved(tiny_hf: Path, tiny_mistral: Path) -> None:
    from vlmserve.models.pixtral.mistral_format import interleaved_to_rotate_half

    with safe_open(str(tiny_hf / "model.safetensors"), framework="pt") as f:
        hf_q = f.get_tensor("language_model.model.layers.0.self_attn.q_proj.weight")
        hf_v = f.get_tensor("language_model.model.layers.0.self_attn.v_proj.weight")
    with safe_open(str(tiny_mistral / "consolidated.safetensors"), framework="pt") as f:
        wq = f.get_tensor("layers.0.attention.wq.weight")
        wv = f.get_tensor("layers.0.attention.wv.weight")
    assert not torch.equal(wq, hf_q)
    assert torch.equal(interleaved_to_rotate_half(wq, 4), hf_q)
    assert torch.equal(wv, hf_v)  # only q and k carry RoPE


def test_same_seed_writes_identical_files_and_another_seed_other_weights(tmp_path: Path) -> None:
    a = make_tiny_model("pixtral", tmp_path / "a", seed=3, format="mistral")
    b = make_tiny_model("pixtral", tmp_path / "b", seed=3, format="mistral")
    c = make_tiny_model("pixtral", tmp_path / "c", seed=4, format="mistral")
    for name in MISTRAL_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "consolidated.safetensors").read_bytes() != (c / "consolidated.safetensors").read_bytes()


@pytest.mark.parametrize("fmt, files", [("hf", HF_FILES), ("mistral", MISTRAL_FILES)])
def test_cli_make_tiny_model_writes_the_requested_format(tmp_path: Path, fmt: str, files: set[str]) -> None:
    cli_main(["make-tiny-model", "--family", "pixtral", "--format", fmt, "--out", str(tmp_path / fmt)])
    assert {p.name for p in (tmp_path / fmt).iterdir()} == files
    if fmt == "hf":
        config = json.loads((tmp_path / fmt / "config.json").read_text())
        assert config["vision_config"]["model_type"] == "pixtral"
