"""Our Mllama processor against transformers' `MllamaProcessor` (PIL image backend) on the
tiny checkpoint: token ids, tiles (bit-identical), aspect-ratio ids and masks, and our
per-token cross ranges against its `cross_attention_mask`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import MllamaImageProcessorPil
from transformers import MllamaProcessor as HFMllamaProcessor

from vlmserve.models.mllama.image_processor import MllamaImageProcessor
from vlmserve.models.mllama.processor import cross_row_positions, mllama_pixel_values
from tests.models.mllama.conftest import random_image


@pytest.fixture(scope="module")
def hf_processor(mllama_ckpt):
    return HFMllamaProcessor.from_pretrained(mllama_ckpt)


SIZES = [(50, 100), (100, 50), (56, 56), (3, 2), (97, 111), (37, 201), (300, 20), (20, 300), (113, 57), (400, 400)]


@pytest.mark.parametrize("size", SIZES)
def test_image_tiles_equal_transformers_bit_for_bit(size) -> None:
    image = random_image(*size, seed=sum(size))
    hf = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4,
                                 image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711])
    expected = hf(images=[[image]], return_tensors="np")
    ours = MllamaImageProcessor(tile_size=56, max_image_tiles=4).preprocess(image)

    n = ours.num_tiles
    assert expected["aspect_ratio_ids"].tolist() == [[ours.aspect_ratio_id]]
    assert expected["aspect_ratio_mask"][0, 0].tolist() == [1] * n + [0] * (4 - n)
    np.testing.assert_array_equal(expected["pixel_values"][0, 0, :n], ours.pixel_values.numpy())


def test_transparent_image_is_composited_on_white_as_transformers() -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (40, 70, 4), dtype=np.uint8)
    image = Image.fromarray(rgba, mode="RGBA")
    hf = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4)
    expected = hf(images=[[image]], return_tensors="np")["pixel_values"][0, 0]
    ours = MllamaImageProcessor.from_preprocessor_config({"size": {"height": 56, "width": 56}}).preprocess(image)
    np.testing.assert_array_equal(expected[: ours.num_tiles], ours.pixel_values.numpy())


CONVERSATIONS = {
    "one_image": ([(50, 100)], [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]),
    "separate_images": (
        [(60, 60), (40, 150)],
        [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                      {"type": "text", "text": "and"}, {"type": "image"}]}],
    ),
    "consecutive_images": (
        [(30, 90), (130, 70), (3, 2)],
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "image"},
                                      {"type": "text", "text": "What differs?"}]}],
    ),
    "multi_turn_with_system": (
        [(45, 80), (200, 100)],
        [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "A dog."}]},
         {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]}],
    ),
    "text_only": ([], [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]),
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_prompt_equals_transformers(mllama_processor, hf_processor, name: str) -> None:
    sizes, conversation = CONVERSATIONS[name]
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    with_images = iter(images)
    hf_conv = [{"role": m["role"], "content": [dict(c, image=next(with_images)) if c["type"] == "image" else c
                                               for c in m["content"]]} for m in conversation]
    expected = hf_processor.apply_chat_template(hf_conv, tokenize=True, return_dict=True, add_generation_prompt=True)

    ours = mllama_processor.render_chat(conversation, images)

    ids = ours.prompt_token_ids
    assert ids == list(expected["input_ids"][0])
    assert ids.count(mllama_processor.tokenizer.bos_token_id) == 1 and ids[0] == mllama_processor.tokenizer.bos_token_id
    assert [it.offset for it in ours.mm_items] == [i for i, t in enumerate(ids) if t == mllama_processor.image_token_id]
    if not images:
        assert ours.cross_ranges is None and not ours.mm_items
        return
    for i, item in enumerate(ours.mm_items):
        n = item.data["num_tiles"]
        assert item.length == 1 and not item.is_embed.any() and item.cross_attn_tokens == 4 * 17
        assert item.data["aspect_ratio_id"] == int(expected["aspect_ratio_ids"][0][i])
        np.testing.assert_array_equal(np.asarray(expected["pixel_values"][0][i])[:n], mllama_pixel_values(item).numpy())
    assert_ranges_equal_mask(ours, np.asarray(expected["cross_attention_mask"][0]), num_patches=17)


def assert_ranges_equal_mask(prompt, mask: np.ndarray, num_patches: int) -> None:
    """mask [L, images, tiles] (transformers) vs our ranges [L, 2] over the real-rows-first
    layout: the same (image, tile, patch) rows per token; an all-zero mask row ↔ empty range."""
    real = [it.data["num_tiles"] * num_patches for it in prompt.mm_items]
    offsets = np.concatenate([[0], np.cumsum(real)])
    for t, row in enumerate(mask):
        want = set()
        for i, tiles in enumerate(row):
            for tile in np.flatnonzero(tiles):
                assert tile < prompt.mm_items[i].data["num_tiles"]  # padded tiles are never attended
                want |= set(range(offsets[i] + tile * num_patches, offsets[i] + (tile + 1) * num_patches))
        start, end = prompt.cross_ranges[t]
        assert set(range(start, end)) == want, f"token {t}"


def test_cross_row_positions_put_real_rows_first_then_padding() -> None:
    # Two images of 4 tile slots x 2 rows: 1 and 3 real tiles.
    positions = cross_row_positions([2, 6], rows_per_image=8)
    assert positions.tolist() == [0, 1, 8, 9, 10, 11, 12, 13, 2, 3, 4, 5, 6, 7, 14, 15]


def test_completion_prompt_has_one_bos_and_rejects_image_tokens(mllama_processor) -> None:
    tok = mllama_processor.tokenizer
    prompt = mllama_processor.render_completion("Hello world")
    assert prompt.prompt_token_ids[0] == tok.bos_token_id and prompt.prompt_token_ids.count(tok.bos_token_id) == 1
    assert mllama_processor.render_completion("<|begin_of_text|>Hi").prompt_token_ids.count(tok.bos_token_id) == 1
    with pytest.raises(ValueError, match="may not contain"):
        mllama_processor.render_completion("<|image|>Hello")


def test_image_count_must_match_placeholders(mllama_processor) -> None:
    conv = CONVERSATIONS["one_image"][1]
    with pytest.raises(ValueError, match="1 image placeholder"):
        mllama_processor.render_chat(conv, [])


def test_generation_settings_come_from_the_checkpoint(mllama_processor) -> None:
    tok = mllama_processor.tokenizer
    eot, eom, eot_text = (tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"))
    assert set(mllama_processor.eos_token_ids) == {eot, eom, eot_text}
    assert mllama_processor.generation_defaults() == {"temperature": 0.6, "top_p": 0.9}
    assert mllama_processor.render_chat(*_one(CONVERSATIONS["one_image"])).mm_items[0].data["pixels"].dtype == np.uint8


def _one(case):
    sizes, conv = case
    return conv, [random_image(h, w, seed=0) for h, w in sizes]
