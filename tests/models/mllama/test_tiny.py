"""The tiny checkpoint: deterministic, the published file set, Llama 3's token layout."""

from __future__ import annotations

import json

from vlmserve.models.registry import family_for_config, make_tiny_model


def test_same_seed_gives_identical_files_and_seed_changes_only_weights(tmp_path) -> None:
    a = make_tiny_model("mllama", tmp_path / "a", seed=0)
    b = make_tiny_model("mllama", tmp_path / "b", seed=0)
    c = make_tiny_model("mllama", tmp_path / "c", seed=1)
    names = sorted(p.name for p in a.iterdir())
    assert names == ["chat_template.json", "config.json", "generation_config.json", "model.safetensors",
                     "preprocessor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
        same = (a / name).read_bytes() == (c / name).read_bytes()
        assert same == (name != "model.safetensors"), name


def test_image_token_sits_right_after_the_text_vocabulary(mllama_ckpt, mllama_processor) -> None:
    config = json.loads((mllama_ckpt / "config.json").read_text())
    assert family_for_config(config).name == "mllama"
    vocab = config["text_config"]["vocab_size"]
    assert config["image_token_index"] == vocab == mllama_processor.tokenizer.convert_tokens_to_ids("<|image|>")
    assert mllama_processor.tokenizer.bos_token == "<|begin_of_text|>"
