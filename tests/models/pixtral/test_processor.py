"""Our Pixtral processor against the references of each format.

HF format: pixels against transformers' `PixtralImageProcessorPil` (exact); prompt ids against
the checkpoint's chat template rendered by transformers plus the published expansion — patch
grid from transformers' `get_resize_output_image_size`, then `[IMG]` x cols + `[IMG_BREAK]` per
row, `[IMG_END]` last — since `PixtralProcessor` itself needs torchvision, which does not load here.
Mistral format: prompt ids against mistral-common's own `encode_chat_completion` (stock image
encoder, OpenCV), pixels against its OpenCV resize (float32 tolerance).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.models.pixtral.image_processing_pil_pixtral import (
    PixtralImageProcessorPil,
    get_resize_output_image_size,
)

from vlmserve.kernels import reference
from vlmserve.kernels.normalize_patchify import normalize_patchify
from vlmserve.models.layers.pixels import uint8_tensor
from vlmserve.models.pixtral.image_processor import PixtralImageProcessor
from vlmserve.models.pixtral.processor import PixtralProcessor, image_layout, pixtral_pixel_values
from vlmserve.models.pixtral.vision import patchify
from tests.models.pixtral.conftest import CHATS, chat_images, random_image

SIZES = [(40, 56), (333, 517), (5, 7), (256, 256), (600, 90), (1000, 1000), (257, 3), (643, 1024)]
IMG, IMG_BREAK, IMG_END = 10, 12, 13


@pytest.fixture(scope="module")
def hf_processor(tiny_hf: Path) -> PixtralProcessor:
    return PixtralProcessor(tiny_hf, json.loads((tiny_hf / "config.json").read_text()))


@pytest.fixture(scope="module")
def mistral_processor(tiny_mistral: Path) -> PixtralProcessor:
    from vlmserve.models.loader import read_hf_config

    return PixtralProcessor(tiny_mistral, read_hf_config(tiny_mistral))


@pytest.mark.parametrize("size", SIZES)
def test_hf_pixels_equal_transformers_pil_image_processor(tiny_hf: Path, hf_processor, size) -> None:
    image = random_image(*size, seed=sum(size))
    expected = PixtralImageProcessorPil.from_pretrained(tiny_hf)(images=[image], return_tensors="np")
    pixel_values, (rows, cols) = hf_processor.image_processor.preprocess(image)

    assert [rows * 16, cols * 16] == list(expected["image_sizes"][0])
    assert np.abs(pixel_values.numpy() - expected["pixel_values"][0]).max() <= 1e-6


@pytest.mark.parametrize("name", list(CHATS))
def test_hf_prompt_is_the_template_with_each_image_expanded_to_its_patch_grid(tiny_hf: Path, hf_processor, name):
    conversation, sizes = CHATS[name]
    images = chat_images(name)
    tok = AutoTokenizer.from_pretrained(tiny_hf)
    text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    expected: list[int] = []
    grids = iter(get_resize_output_image_size(np.asarray(im), 256, 16, "channels_last") for im in images)
    for t in tok(text, add_special_tokens=False)["input_ids"]:
        if t == IMG:
            h, w = next(grids)
            expected += image_layout(h // 16, w // 16, IMG, IMG_BREAK, IMG_END)
        else:
            expected.append(t)

    got = hf_processor.render_chat(conversation, images)

    assert text.startswith("<s>[INST]") and got.prompt_text == text
    assert got.prompt_token_ids == expected and expected.count(1) == 1  # exactly one BOS
    assert len(got.mm_items) == len(images)
    ids = np.asarray(expected)
    covered = np.zeros(len(ids), dtype=bool)
    for item in got.mm_items:
        rows, cols = item.data["patch_grid"]
        span = ids[item.offset : item.offset + item.length]
        assert item.length == rows * (cols + 1) and span[-1] == IMG_END
        assert np.array_equal(item.is_embed, span == IMG) and item.num_embeds == rows * cols
        assert item.data["pixels"].shape == (rows * 16, cols * 16, 3) and item.data["pixels"].dtype == np.uint8
        covered[item.offset : item.offset + item.length] = True
    assert np.array_equal(covered, np.isin(ids, [IMG, IMG_BREAK, IMG_END]))


def test_converted_hf_tokenizer_encodes_text_like_the_tekken_file(tiny_hf: Path, tiny_mistral: Path) -> None:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    tekken = Tekkenizer.from_file(tiny_mistral / "tekken.json")
    tok = AutoTokenizer.from_pretrained(tiny_hf)
    for text in ["Hello, who are you?", "  Describe\n\nthe 2 pictures: déjà vu!", "don't STOP 12345 ##", "汉字 ok"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == tekken.encode(text, bos=False, eos=False)
        assert tok.decode(tekken.encode(text, bos=False, eos=False)) == text


def _mistral_common_request(conversation, images):
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"user": UserMessage, "system": SystemMessage, "assistant": AssistantMessage}
    images = iter(images)
    messages = []
    for msg in conversation:
        content = msg["content"]
        if not isinstance(content, str):
            content = [ImageChunk(image=next(images)) if p["type"] == "image" else TextChunk(text=p["text"])
                       for p in content]
        messages.append(kinds[msg["role"]](content=content))
    return ChatCompletionRequest(messages=messages)


@pytest.mark.parametrize("name", list(CHATS))
def test_mistral_prompt_ids_equal_mistral_common_encode_chat_completion(tiny_mistral: Path, mistral_processor, name):
    pytest.importorskip("cv2")  # mistral-common's stock image encoder needs OpenCV
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    conversation, _ = CHATS[name]
    images = chat_images(name)
    stock = MistralTokenizer.from_file(str(tiny_mistral / "tekken.json"))
    expected = stock.encode_chat_completion(_mistral_common_request(conversation, images))

    got = mistral_processor.render_chat(conversation, images)

    assert got.prompt_token_ids == expected.tokens
    assert len(got.mm_items) == len(expected.images) == len(images)
    for item, ref in zip(got.mm_items, expected.images):
        pv = pixtral_pixel_values(item).numpy()
        assert pv.shape == ref.shape
        assert np.abs(pv - ref).max() <= 2e-4  # OpenCV's float32 cubic vs ours
        span = np.asarray(got.prompt_token_ids[item.offset : item.offset + item.length])
        assert np.array_equal(item.is_embed, span == IMG) and span[-1] == IMG_END


@pytest.mark.parametrize("size", SIZES)
def test_patch_grids_follow_each_format_reference_rounding(size) -> None:
    from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs

    height, width = size
    encoder = ImageEncoder(ImageConfig(16, 256), SpecialImageIDs(IMG, IMG_BREAK, IMG_END))
    cols, rows = encoder._image_to_num_tokens(Image.new("RGB", (width, height)))
    h, w = get_resize_output_image_size(np.zeros((height, width, 3)), 256, 16, "channels_last")

    assert PixtralImageProcessor(mode="mistral", longest_edge=256).patch_grid(height, width) == (rows, cols)
    assert PixtralImageProcessor(mode="hf", longest_edge=256).patch_grid(height, width) == (h // 16, w // 16)
    if size == (643, 1024):  # 643 / 4 = 160.75: floor gives 10 rows, round 11
        assert (rows, h // 16) == (11, 10)


def test_content_hash_tracks_pixels_and_settings(hf_processor, mistral_processor) -> None:
    conversation = CHATS["one_image"][0]
    first = hf_processor.render_chat(conversation, [random_image(40, 56, 0)]).mm_items[0].content_hash
    assert hf_processor.render_chat(conversation, [random_image(40, 56, 0)]).mm_items[0].content_hash == first
    assert hf_processor.render_chat(conversation, [random_image(40, 56, 1)]).mm_items[0].content_hash != first
    assert mistral_processor.render_chat(conversation, [random_image(40, 56, 0)]).mm_items[0].content_hash != first


def test_image_count_mismatch_and_image_tokens_in_completions_are_value_errors(hf_processor, mistral_processor):
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\).*2 image\(s\)"):
        hf_processor.render_chat(CHATS["one_image"][0], [random_image(9, 9, 0), random_image(9, 9, 1)])
    with pytest.raises(ValueError, match="image"):
        mistral_processor.render_chat(CHATS["text_only"][0], [random_image(9, 9, 0)])
    for processor in (hf_processor, mistral_processor):
        with pytest.raises(ValueError, match=r"\[IMG\]"):
            processor.render_completion([1, 5, IMG, 1100])


def test_completion_prompts_get_one_bos_in_both_formats(hf_processor, mistral_processor) -> None:
    hf = hf_processor.render_completion("Hello world")
    mistral = mistral_processor.render_completion("Hello world")
    assert hf.prompt_token_ids == mistral.prompt_token_ids and hf.prompt_token_ids[0] == 1
    assert hf.prompt_token_ids.count(1) == 1
    assert hf_processor.eos_token_ids == mistral_processor.eos_token_ids == [2]
    assert hf_processor.generation_defaults() == {"temperature": 0.0}


@pytest.mark.parametrize("size", [(40, 56), (333, 517), (5, 7)])
def test_hf_items_cross_as_uint8_and_normalise_to_transformers_bit_for_bit(tiny_hf: Path, hf_processor, size):
    image = random_image(*size, seed=7 + sum(size))
    expected = PixtralImageProcessorPil.from_pretrained(tiny_hf)(images=[image], return_tensors="np")["pixel_values"][0]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    (item,) = hf_processor.render_chat(conversation, [image]).mm_items
    item = pickle.loads(pickle.dumps(item))  # what the engine core receives through its pipe
    assert "pixel_values" not in item.data
    pixels = item.data["pixels"]
    assert pixels.dtype == np.uint8 and pixels.shape == (*expected.shape[1:], 3)
    assert torch.equal(pixtral_pixel_values(item), torch.from_numpy(expected))
    # What embed_multimodal computes beside the tower: the reference (CPU) and the Triton kernel
    # (the interpreter here, compiled on a GPU) give transformers' patches exactly.
    want = patchify(torch.from_numpy(expected), 16)
    lut = torch.from_numpy(item.data["lut"].copy())
    assert torch.equal(reference.normalize_patchify(uint8_tensor(pixels), lut, 16, 1, 1, "patches"), want)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = normalize_patchify(uint8_tensor(pixels).to(device), lut.to(device), 16, 1, 1, "patches")
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("size", [(40, 56), (333, 517), (700, 700), (643, 1024)])
def test_mistral_items_cross_as_the_fewer_bytes_of_two_exact_forms(mistral_processor, size) -> None:
    # OpenCV's float cubic resize is not uint8: the source crosses as uint8 when it is no
    # larger than the float32 result (resized beside the tower), else the result does.
    pytest.importorskip("cv2")
    from mistral_common.tokens.tokenizers.image import transform_image

    image = random_image(*size, seed=3 + sum(size))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    (item,) = mistral_processor.render_chat(conversation, [image]).mm_items
    item = pickle.loads(pickle.dumps(item))  # what the engine core receives through its pipe
    rows, cols = item.data["patch_grid"]
    result_bytes, source_bytes = rows * cols * 16 * 16 * 3 * 4, size[0] * size[1] * 3
    if source_bytes <= result_bytes:
        src = item.data["source_pixels"]
        assert src.dtype == np.uint8 and src.shape == (*size, 3) and "pixel_values" not in item.data
    else:
        assert "source_pixels" not in item.data and item.data["pixel_values"].dtype == torch.float32
        assert item.data["pixel_values"].numel() * 4 == result_bytes < source_bytes
    ref = transform_image(image, (cols * 16, rows * 16))
    assert np.abs(pixtral_pixel_values(item).numpy() - ref).max() <= 2e-4  # OpenCV's float32 cubic vs ours
