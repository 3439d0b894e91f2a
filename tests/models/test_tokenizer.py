"""Tokenizer loading, chat rendering and BOS handling (server/models/tokenizer.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from vlmserve.models.qwen2_vl.tiny import QWEN2_VL_CHAT_TEMPLATE, make_tiny_qwen2_vl
from vlmserve.models.tokenizer import encode_prompt, load_tokenizer, render_chat

IMAGE_CHAT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"))


def copy_without_template(src: Path, dst: Path) -> Path:
    """The checkpoint with tokenizer_config.json's chat_template and chat_template.json removed."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    (dst / "chat_template.json").unlink()
    return dst


def test_renders_exactly_as_transformers_apply_chat_template(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    for conversation, gen in [
        (IMAGE_CHAT, True),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], True),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], False),
    ]:
        expected = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
        assert render_chat(tok, conversation, add_generation_prompt=gen) == expected


def test_chat_template_kwargs_reach_the_template(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    text = render_chat(tok, IMAGE_CHAT, chat_template_kwargs={"add_vision_id": True})
    assert "Picture 1: <|vision_start|>" in text
    assert "Picture 1:" not in render_chat(tok, IMAGE_CHAT)
    with pytest.raises(ValueError, match="tokenize"):
        render_chat(tok, IMAGE_CHAT, chat_template_kwargs={"tokenize": True})


def test_explicit_chat_template_overrides_the_checkpoint(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    assert render_chat(tok, [{"role": "user", "content": "x"}], chat_template=template) == "[user]x"


def test_template_errors_become_value_errors(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(ValueError, match="only user turns"):
        render_chat(tok, [{"role": "user", "content": "x"}], chat_template=template)


def test_legacy_chat_template_json_is_picked_up(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_without_template(tiny_dir, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(load_tokenizer(ckpt), IMAGE_CHAT)
    (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_VL_CHAT_TEMPLATE}))
    assert "<|image_pad|>" in render_chat(load_tokenizer(ckpt), IMAGE_CHAT)


def test_chat_template_jinja_wins_over_chat_template_json(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_without_template(tiny_dir, tmp_path / "ckpt")
    (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ messages[0]['content'] }}"}))
    (ckpt / "chat_template.jinja").write_text("jinja:{{ messages[0]['content'] }}")
    assert render_chat(load_tokenizer(ckpt), [{"role": "user", "content": "x"}]) == "jinja:x"


def test_missing_directory_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="local checkpoint"):
        load_tokenizer(tmp_path / "nope")


def test_qwen_prompt_encodes_without_extra_tokens(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    text = render_chat(tok, IMAGE_CHAT)
    ids = encode_prompt(tok, text)
    assert tok.bos_token is None
    assert ids == Tokenizer.from_file(str(tiny_dir / "tokenizer.json")).encode(text).ids
    assert tok.decode(ids) == text


@pytest.fixture()
def bos_tokenizer(tiny_dir: Path) -> PreTrainedTokenizerFast:
    """The tiny vocabulary with a post-processor that prepends BOS (Llama-style)."""
    raw = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    bos_id = raw.token_to_id("<|endoftext|>")
    raw.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>")


def test_bos_is_added_once_when_the_template_omits_it(bos_tokenizer: PreTrainedTokenizerFast) -> None:
    bos_id = bos_tokenizer.bos_token_id
    ids = encode_prompt(bos_tokenizer, "hello world")
    assert ids[0] == bos_id and ids.count(bos_id) == 1


def test_bos_is_not_doubled_when_the_template_renders_it(bos_tokenizer: PreTrainedTokenizerFast) -> None:
    bos_id = bos_tokenizer.bos_token_id
    ids = encode_prompt(bos_tokenizer, "<|endoftext|>hello world")
    assert ids[0] == bos_id and ids.count(bos_id) == 1
    assert ids == encode_prompt(bos_tokenizer, "hello world")
