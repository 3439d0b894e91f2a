"""Our Qwen2-VL prompt processor against transformers' Qwen2VLProcessor and get_rope_index.

transformers' `Qwen2VLProcessor.__init__` fails without torchvision when no video processor
is given; `_HFProcessor` skips the class check for that None argument and is otherwise the
real class (the image processor is `Qwen2VLImageProcessorPil`, see test_image_processor.py).
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor as HFQwen2VLProcessor

from vlmserve.models.qwen2_vl.image_processor import pixels_hash
from vlmserve.models.qwen2_vl.processor import Qwen2VLProcessor, mrope_positions, qwen2_vl_pixel_values
from vlmserve.models.qwen2_vl.tiny import make_tiny_qwen2_vl


class _HFProcessor(HFQwen2VLProcessor):
    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)


def image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


CASES = {
    "one_image": (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this picture."}]}],
        [(90, 120)],
    ),
    "two_images_with_text_between": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare"},
                    {"type": "image"},
                    {"type": "text", "text": "with the second one:"},
                    {"type": "image"},
                    {"type": "text", "text": "What differs?"},
                ],
            }
        ],
        [(333, 517), (60, 200)],
    ),
    "text_only": ([{"role": "user", "content": "Hello, who are you?"}], []),
    "multi_turn_with_assistant": (
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
            {"role": "assistant", "content": "It is red."},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
        ],
        [(56, 56), (100, 40)],
    ),
    "system_message": (
        [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Animal?"}]},
        ],
        [(140, 84)],
    ),
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl"))


@pytest.fixture(scope="module")
def hf_config(tiny_dir: Path) -> dict:
    return json.loads((tiny_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def ours(tiny_dir: Path, hf_config: dict) -> Qwen2VLProcessor:
    return Qwen2VLProcessor(tiny_dir, hf_config)


@pytest.fixture(scope="module")
def hf(tiny_dir: Path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ip = Qwen2VLImageProcessorPil.from_pretrained(tiny_dir)
        processor = _HFProcessor(
            image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template
        )
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_dir).eval()
    return processor, model


@pytest.mark.parametrize("case", sorted(CASES))
def test_prompt_ids_pixels_and_mrope_positions_match_transformers(case: str, ours: Qwen2VLProcessor, hf) -> None:
    conversation, sizes = CASES[case]
    images = [image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    hf_processor, hf_model = hf

    text = hf_processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    expected = hf_processor(text=[text], images=images or None, return_tensors="pt")
    got = ours.render_chat(conversation, images)

    assert got.prompt_text == text
    assert got.prompt_token_ids == expected["input_ids"][0].tolist()

    grids = expected.get("image_grid_thw")
    hf_positions, hf_delta = hf_model.model.get_rope_index(
        expected["input_ids"], expected["mm_token_type_ids"], image_grid_thw=grids
    )
    assert got.mrope_positions.dtype == np.int64
    assert np.array_equal(got.mrope_positions, hf_positions[:, 0].numpy())
    assert got.mrope_delta == int(hf_delta[0, 0])

    assert len(got.mm_items) == len(images)
    if images:
        ours_pixels = torch.cat([qwen2_vl_pixel_values(item) for item in got.mm_items])
        assert torch.equal(ours_pixels, expected["pixel_values"])
        assert torch.equal(torch.tensor([item.data["grid_thw"] for item in got.mm_items]), grids)
    is_image = expected["input_ids"][0] == ours.image_token_id
    covered = torch.zeros_like(is_image)
    for item in got.mm_items:
        assert item.modality == "image"
        assert item.length == np.prod(item.data["grid_thw"]) // 4
        covered[item.offset : item.offset + item.length] = True
    assert torch.equal(covered, is_image)


def test_image_count_mismatch_is_a_clear_value_error(ours: Qwen2VLProcessor) -> None:
    conversation, _ = CASES["one_image"]
    with pytest.raises(ValueError, match=r"1 image placeholder\(s\).*2 image\(s\)"):
        ours.render_chat(conversation, [image(50, 50, 0), image(50, 50, 1)])
    with pytest.raises(ValueError, match=r"0 image placeholder\(s\).*1 image\(s\)"):
        ours.render_chat(CASES["text_only"][0], [image(50, 50, 0)])


def test_content_hash_tracks_pixels_and_processor_settings(tiny_dir: Path, hf_config: dict, ours) -> None:
    conversation, _ = CASES["one_image"]
    first = ours.render_chat(conversation, [image(90, 120, 0)]).mm_items[0].content_hash
    assert ours.render_chat(conversation, [image(90, 120, 0)]).mm_items[0].content_hash == first
    assert ours.render_chat(conversation, [image(90, 120, 1)]).mm_items[0].content_hash != first
    smaller = Qwen2VLProcessor(tiny_dir, hf_config, max_pixels=28 * 28 * 4)
    item = smaller.render_chat(conversation, [image(90, 120, 0)]).mm_items[0]
    assert item.content_hash != first
    assert item.length <= 4
    assert len(first) == 64 and int(first, 16) >= 0  # sha256 hex


def test_image_item_carries_resized_uint8_pixels_and_leaves_the_shared_image_untouched(ours) -> None:
    conversation, _ = CASES["one_image"]
    img = image(90, 120, 0)
    before = img.tobytes()
    (item,) = ours.render_chat(conversation, [img]).mm_items
    assert img.tobytes() == before  # decoded images are shared by the media cache: read-only
    ip = ours.image_processor
    pixels = item.data["pixels"]
    assert pixels.dtype == np.uint8 and pixels.shape == (*ip.resized_size(90, 120), 3)
    assert np.array_equal(pixels, ip.resize(img))
    grid = item.data["grid_thw"]
    assert grid == ip.grid(pixels) and item.data["patchify"] == (14, 2, 2)
    # The hash is over the resized uint8 pixels, the grid and the settings, as before.
    assert item.content_hash == pixels_hash("image", pixels, grid, ip.settings_key())
    # uint8 (1/4 of float32) of one frame (the float rows repeat it over the temporal patch of 2).
    float_bytes = qwen2_vl_pixel_values(item).numel() * 4
    assert len(pickle.dumps(item.data, protocol=pickle.HIGHEST_PROTOCOL)) < float_bytes / 6
    assert torch.equal(qwen2_vl_pixel_values(item), ip.preprocess_image(img)[0])


def test_mrope_after_an_image_resumes_past_its_largest_position() -> None:
    # 2 text tokens, a 1x4x6 grid (2x3 merged tokens), 2 text tokens.
    ids = [1, 2] + [9] * 6 + [3, 4]
    positions, delta = mrope_positions(ids, [(2, 6, (1, 4, 6))], merge_size=2)
    assert positions[:, :2].tolist() == [[0, 1]] * 3
    assert positions[0, 2:8].tolist() == [2] * 6
    assert positions[1, 2:8].tolist() == [2, 2, 2, 3, 3, 3]
    assert positions[2, 2:8].tolist() == [2, 3, 4, 2, 3, 4]
    assert positions[:, 8:].tolist() == [[5, 6]] * 3
    assert delta == 7 - 10


def test_render_completion_text_and_ids(ours: Qwen2VLProcessor) -> None:
    got = ours.render_completion("The sky is")
    assert got.prompt_token_ids == ours.tokenizer("The sky is").input_ids
    assert got.mrope_positions.shape == (3, len(got.prompt_token_ids))
    assert (got.mrope_positions == np.arange(len(got.prompt_token_ids))).all()
    assert got.mrope_delta == 0 and got.mm_items == []
    assert ours.render_completion([5, 6, 7]).prompt_token_ids == [5, 6, 7]
    with pytest.raises(ValueError, match="token ids must be in"):
        ours.render_completion([5, ours.vocab_size])
    with pytest.raises(ValueError, match="chat/completions"):
        ours.render_completion("<|image_pad|> what")
    with pytest.raises(ValueError, match="empty"):
        ours.render_completion([])


def test_eos_ids_and_generation_defaults_follow_generation_config(ours: Qwen2VLProcessor, tiny_dir: Path) -> None:
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    tok = ours.tokenizer
    assert ours.eos_token_ids == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    assert gen["do_sample"] is True
    assert ours.generation_defaults() == {"repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}


def test_do_sample_false_means_greedy_and_nested_text_config_is_read(tiny_dir: Path, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(tiny_dir, tmp_path / "ckpt"))
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen.update(do_sample=False, eos_token_id=gen["eos_token_id"][0])
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    flat = json.loads((ckpt / "config.json").read_text())
    nested = {k: v for k, v in flat.items() if not k.endswith("token_id")}
    nested["text_config"] = {k: v for k, v in flat.items() if k.endswith("token_id")}
    processor = Qwen2VLProcessor(ckpt, nested)
    assert processor.generation_defaults() == {"repetition_penalty": 1.05, "temperature": 0.0}
    assert processor.eos_token_ids == [flat["eos_token_id"]]
    assert processor.image_token_id == flat["image_token_id"]


def test_config_ids_that_disagree_with_the_tokenizer_are_rejected(tiny_dir: Path, hf_config: dict) -> None:
    with pytest.raises(ValueError, match="do not belong together"):
        Qwen2VLProcessor(tiny_dir, {**hf_config, "image_token_id": hf_config["image_token_id"] + 1})


def test_image_settings_nested_in_processor_config_win_as_in_transformers(tiny_dir: Path, hf_config: dict,
                                                                          tmp_path: Path) -> None:
    """transformers 5 saves a processor as processor_config.json with a nested "image_processor"
    (and no preprocessor_config.json); AutoImageProcessor reads that first."""
    from transformers import AutoImageProcessor

    ckpt = tmp_path / "v5_layout"
    shutil.copytree(tiny_dir, ckpt)
    legacy = json.loads((ckpt / "preprocessor_config.json").read_text())
    (ckpt / "preprocessor_config.json").write_text(json.dumps({**legacy, "max_pixels": 12845056}))
    nested = {**legacy, "size": {"shortest_edge": 3136, "longest_edge": 50176}}
    nested.pop("min_pixels"), nested.pop("max_pixels")
    (ckpt / "processor_config.json").write_text(json.dumps({"image_processor": nested,
                                                            "processor_class": "Qwen2VLProcessor"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AutoImageProcessor.from_pretrained(ckpt)
    ours_v5 = Qwen2VLProcessor(ckpt, hf_config)
    img = image(448, 448, seed=3)
    prompt = ours_v5.render_chat([{"role": "user", "content": [{"type": "image"}]}], [img])
    expected_grid = reference(images=img, return_tensors="pt")["image_grid_thw"][0].tolist()
    assert list(prompt.mm_items[0].data["grid_thw"]) == expected_grid == [1, 16, 16]
    assert prompt.mm_items[0].length == 64
