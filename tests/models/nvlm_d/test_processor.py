"""NVLM-D's processor against the golden fixtures (the model card's `load_image` and
`chat()`'s query, from the official code) and against the official rules it reproduces."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmserve.models.loader import read_hf_config
from vlmserve.models.nvlm_d.image_processor import NVLMDImageProcessor, target_ratios
from vlmserve.models.nvlm_d.processor import NVLMDProcessor, build_query
from tests.models.nvlm_d.conftest import CASES, case_inputs, golden_processor, golden_summary, user_turn
from tests.utils import image

PIXEL_ATOL = 1e-6  # the fixtures' README


@pytest.fixture(scope="module")
def processor(golden) -> NVLMDProcessor:
    ckpt = golden / "checkpoint"
    return NVLMDProcessor(ckpt, read_hf_config(ckpt))


@pytest.mark.parametrize("case", CASES)
def test_tiles_equal_the_model_card_load_image(processor, case):
    img, _ = case_inputs(case)
    want = golden_processor(case)
    tiles = processor.image_processor.tiles(img)
    assert tiles.dtype == np.uint8 and tiles.shape[0] == int(want["num_tiles"])
    got = processor.image_processor.pixel_values(tiles).numpy()
    assert got.shape == want["pixel_values"].shape
    np.testing.assert_allclose(got, want["pixel_values"], rtol=0, atol=PIXEL_ATOL)


@pytest.mark.parametrize("case", CASES)
def test_prompt_text_and_ids_equal_chat(processor, golden, case):
    img, question = case_inputs(case)
    prompt = processor.render_chat([user_turn(question)], [img])
    assert prompt.prompt_text == (golden / "golden" / f"{case}_prompt.txt").read_text(encoding="utf-8")
    want = golden_processor(case)
    assert prompt.prompt_token_ids == want["input_ids"].tolist()
    assert len(prompt.prompt_token_ids) == golden_summary(case)["input_ids_len"]
    (item,) = prompt.mm_items
    ids = np.asarray(prompt.prompt_token_ids)
    pads = np.flatnonzero(ids == processor.image_token_id)
    assert item.num_embeds == len(pads) == golden_summary(case)["n_image_context_tokens"]
    # The item spans first..last pad; the tile tags inside keep their token embeddings.
    assert item.offset == pads[0] and item.offset + item.length == pads[-1] + 1
    assert np.array_equal(np.flatnonzero(item.is_embed) + item.offset, pads)


def test_text_after_the_image_goes_first_too(processor):
    # chat() prepends "<image>\n" to a question without a mark: part order does not matter.
    img, question = case_inputs("case2")
    a = processor.render_chat([user_turn(question)], [img])
    b = processor.render_chat([{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}],
                              [img])
    split = processor.render_chat(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + question}]}], [img])
    marked = processor.render_chat(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image>\n" + question}]}], [img])
    assert a.prompt_token_ids == b.prompt_token_ids == split.prompt_token_ids == marked.prompt_token_ids


def test_query_follows_the_chatml_template_of_conversation_py():
    conv = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "text", "text": "Image-1: "}, {"type": "image"},
                                     {"type": "text", "text": "\nImage-2: "}, {"type": "image"},
                                     {"type": "text", "text": "\nCompare."}]},
    ]
    query, n = build_query(conv)
    assert n == 3
    assert query == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|><|im_start|>assistant\nA cat.<|im_end|>"
        "<|im_start|>user\nImage-1: <image>\nImage-2: <image>\nCompare.<|im_end|><|im_start|>assistant\n"
    )
    # A question split at its marks keeps its own whitespace; images after all text go first.
    split, _ = build_query([{"role": "user", "content": [{"type": "text", "text": "Describe "}, {"type": "image"},
                                                          {"type": "text", "text": " please."}]}])
    assert "<|im_start|>user\nDescribe <image> please.<|im_end|>" in split
    trailing, _ = build_query([{"role": "user", "content": [{"type": "text", "text": "Compare."}, {"type": "image"},
                                                             {"type": "image"}]}])
    assert "<|im_start|>user\n<image>\n<image>\nCompare.<|im_end|>" in trailing
    system, _ = build_query([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert system == "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"


def test_bad_conversations_are_refused_with_a_reason(processor):
    img = image(64, 48, 1)
    two_marks = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image> and <image>"}]}]
    with pytest.raises(ValueError, match="2 <image> mark"):
        processor.render_chat(two_marks, [img])
    late_system = [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]
    with pytest.raises(ValueError, match="system message must come first"):
        processor.render_chat(late_system, [])
    pads = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<|vision_pad|>"}]}]
    with pytest.raises(ValueError, match="vision_pad"):
        processor.render_chat(pads, [img])
    with pytest.raises(ValueError, match="vision_pad"):
        processor.render_completion("a <|vision_pad|> b")


def test_tiling_follows_the_official_aspect_ratio_search():
    ip = NVLMDImageProcessor(image_size=448, max_num=6)
    assert len(target_ratios(1, 6)) == 14 and target_ratios(1, 6)[0] == (1, 1)
    assert ip.grid(500, 375) == (3, 2) and ip.grid(300, 900) == (1, 3)
    # An exact tie (aspect 1: (1,1) and (2,2)) goes to the larger grid only for a large image.
    assert ip.grid(1000, 1000) == (2, 2) and ip.grid(300, 300) == (1, 1)
    # One tile: no thumbnail, and the tile is tagged <tile_global_thumbnail>.
    small = ip.tiles(image(300, 300, 2))
    assert small.shape == (1, 448, 448, 3)
    np.testing.assert_array_equal(small[0], np.asarray(image(300, 300, 2).resize((448, 448), Image.BICUBIC)))
    big = ip.tiles(image(1000, 1000, 3))
    assert big.shape == (5, 448, 448, 3)


def test_single_tile_prompt_and_content_hashes(processor):
    a, b = image(300, 300, 5), image(300, 300, 6)
    pa = processor.render_chat([user_turn("Hi")], [a])
    assert "<Image><tile_global_thumbnail>" + "<|vision_pad|>" * 256 + "</Image>\nHi" in pa.prompt_text
    assert "<tile_1>" not in pa.prompt_text
    again = processor.render_chat([user_turn("Other")], [a.copy()])
    pb = processor.render_chat([user_turn("Hi")], [b])
    assert pa.mm_items[0].content_hash == again.mm_items[0].content_hash != pb.mm_items[0].content_hash


def test_text_only_and_completion_prompts(processor):
    prompt = processor.render_chat([{"role": "user", "content": "Hello, who are you?"}], [])
    assert prompt.mm_items == []
    assert prompt.prompt_text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nHello, who are you?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert prompt.prompt_token_ids == processor.tokenizer(prompt.prompt_text)["input_ids"]
    assert processor.eos_token_ids[0] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_generation_defaults_are_greedy_without_a_generation_config(processor, golden, tmp_path):
    assert processor.generation_defaults() == {"temperature": 0.0}
    import json
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(golden / "checkpoint", ckpt)
    (ckpt / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    sampled = NVLMDProcessor(ckpt, read_hf_config(ckpt))
    assert sampled.generation_defaults() == {"temperature": 0.6, "top_p": 0.9}
