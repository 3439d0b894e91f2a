"""The tiny Qwen2-VL checkpoint loads in transformers exactly like a published one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

from vlmserve.models.qwen2_vl.tiny import QWEN2_VL_CHAT_TEMPLATE, SPECIAL_TOKENS, make_tiny_qwen2_vl

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.json",
    "model.safetensors",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"), seed=0)


@pytest.fixture(scope="module")
def hf_model(tiny_dir: Path) -> Qwen2VLForConditionalGeneration:
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    model.loading_info = info
    return model.eval()


def test_writes_every_published_file_quickly(tmp_path: Path) -> None:
    start = time.perf_counter()
    out = make_tiny_qwen2_vl(tmp_path / "ckpt", seed=3)
    elapsed = time.perf_counter() - start
    assert sorted(p.name for p in out.iterdir()) == sorted(CHECKPOINT_FILES)
    assert elapsed < 5.0, f"make_tiny_qwen2_vl took {elapsed:.2f}s"


def test_transformers_loads_weights_with_no_missing_or_unexpected_keys(hf_model) -> None:
    info = hf_model.loading_info
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]


def test_config_is_flat_published_layout_with_tiny_sizes(tiny_dir: Path) -> None:
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2VLForConditionalGeneration"]
    assert cfg["model_type"] == "qwen2_vl"
    assert "text_config" not in cfg
    assert cfg["hidden_size"] == 128 and cfg["num_hidden_layers"] == 2
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2
    assert cfg["rope_scaling"]["type"] == "mrope"
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert sum(cfg["rope_scaling"]["mrope_section"]) == head_dim // 2
    assert cfg["vocab_size"] % 64 == 0
    vc = cfg["vision_config"]
    assert (vc["embed_dim"], vc["depth"], vc["num_heads"], vc["mlp_ratio"]) == (64, 2, 4, 2)
    assert vc["hidden_size"] == cfg["hidden_size"]
    assert cfg["torch_dtype"] == "float32"


def test_config_token_ids_match_the_tokenizer(tiny_dir: Path) -> None:
    cfg = json.loads((tiny_dir / "config.json").read_text())
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert cfg["image_token_id"] == ids["<|image_pad|>"]
    assert cfg["video_token_id"] == ids["<|video_pad|>"]
    assert cfg["vision_start_token_id"] == ids["<|vision_start|>"]
    assert cfg["vision_end_token_id"] == ids["<|vision_end|>"]
    assert cfg["bos_token_id"] == ids["<|endoftext|>"]
    assert cfg["eos_token_id"] == ids["<|im_end|>"] == tok.eos_token_id
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert len(tok) <= cfg["vocab_size"]
    # Special tokens are single ids, never split by the BPE.
    assert tok("<|vision_start|><|image_pad|><|vision_end|>").input_ids == [
        ids["<|vision_start|>"],
        ids["<|image_pad|>"],
        ids["<|vision_end|>"],
    ]


def test_tokenizer_renders_the_published_chat_template(tiny_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert tok.chat_template == QWEN2_VL_CHAT_TEMPLATE
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(tok(text).input_ids) == text


def test_same_seed_is_byte_identical_and_seeds_differ_in_weights_only(tmp_path: Path) -> None:
    a = make_tiny_qwen2_vl(tmp_path / "a", seed=0)
    b = make_tiny_qwen2_vl(tmp_path / "b", seed=0)
    c = make_tiny_qwen2_vl(tmp_path / "c", seed=1)
    for name in CHECKPOINT_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_greedy_decoding_of_random_model_depends_on_prompt_and_stays_in_tokenizer(tiny_dir, hf_model) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = ["What is the color of the sky?", "Count the dogs please", "hello", "Tell me about a river"]
    outputs, gaps = [], []
    for prompt in prompts:
        conversation = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf_model.generate(ids, max_new_tokens=6, do_sample=False)
            logits = hf_model(ids).logits[0, -1]
        outputs.append(tuple(out[0, ids.shape[1] :].tolist()))
        top2 = logits.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
    # The prompts all end in the same "<|im_start|>assistant\n": different outputs mean the
    # model reads the context, not only the last token.
    assert len({o[0] for o in outputs}) > 1, outputs
    assert all(tid < len(tok) for o in outputs for tid in o)
    # Not near-ties: float32 implementations (differences ~1e-5) agree on the argmax.
    assert min(gaps) > 1e-2, gaps
