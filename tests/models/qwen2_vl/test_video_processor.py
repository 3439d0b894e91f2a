"""Our Qwen2-VL video path against transformers' `Qwen2VLVideoProcessor`, `Qwen2VLProcessor` and
`Qwen2VLModel.get_rope_index`.

transformers' video processor has only a torchvision backend, and torchvision cannot be
imported here (its wheels need CUDA libraries). `hf_video` runs transformers' own
`video_processing_qwen2_vl` module anyway (its config loading, smart_resize with the video
limits, temporal padding, patchify, fused normalisation) over a stand-in for the three
`torchvision.transforms.v2.functional` calls that path makes, each written as torchvision does
it for a CPU tensor: `resize` of a uint8 tensor with bicubic + antialias is torch's native
uint8 `interpolate` (torchvision's `_do_native_uint8_resize_on_cpu`), `normalize` is
(x - mean) / std in the tensor's dtype, `grayscale_to_rgb` leaves 3 channels alone. The
stand-in is installed only while the reference runs and removed afterwards.
"""

from __future__ import annotations

import enum
import importlib
import json
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor as HFQwen2VLProcessor

from vlmserve.models.qwen2_vl.processor import Qwen2VLProcessor, mrope_positions, qwen2_vl_pixel_values
from vlmserve.models.qwen2_vl.tiny import make_tiny_qwen2_vl
from vlmserve.models.qwen2_vl.video_processor import Qwen2VLVideoProcessor, read_video_preprocessor_config

_HF_VIDEO_MODULE = "transformers.models.qwen2_vl.video_processing_qwen2_vl"


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _tv_resize(image: torch.Tensor, size, interpolation=_InterpolationMode.BILINEAR, antialias=True, **_):
    if image.dtype != torch.uint8 or interpolation is not _InterpolationMode.BICUBIC:
        raise NotImplementedError("the stand-in covers the uint8 bicubic CPU path only")
    shape = image.shape
    if tuple(size) == tuple(shape[-2:]):
        return image
    out = F.interpolate(image.reshape(-1, *shape[-3:]), size=list(size), mode="bicubic",
                        align_corners=False, antialias=antialias)
    return out.reshape(*shape[:-2], *size)


def _tv_normalize(image: torch.Tensor, mean, std, inplace: bool = False) -> torch.Tensor:
    image = image if inplace else image.clone()
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return image.sub_(mean).div_(std)


def _tv_grayscale_to_rgb(image: torch.Tensor) -> torch.Tensor:
    if image.shape[-3] != 3:
        raise NotImplementedError("the stand-in covers RGB input only")
    return image


@pytest.fixture(scope="module")
def hf_video():
    """transformers' video_processing_qwen2_vl module, running over the torchvision stand-in."""
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as video_utils
    from transformers.image_utils import PILImageResampling
    from transformers.utils.import_utils import is_torchvision_available

    if is_torchvision_available():  # a working torchvision: the real reference, no stand-in
        yield importlib.import_module(_HF_VIDEO_MODULE)
        return

    tv_f = types.ModuleType("torchvision.transforms.v2.functional")
    tv_f.InterpolationMode = _InterpolationMode
    tv_f.resize, tv_f.normalize, tv_f.grayscale_to_rgb = _tv_resize, _tv_normalize, _tv_grayscale_to_rgb
    package = {name: types.ModuleType(name)
               for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.v2")}
    parent = importlib.import_module(_HF_VIDEO_MODULE.rpartition(".")[0])
    with pytest.MonkeyPatch.context() as mp:
        with pytest.MonkeyPatch.context() as import_only:
            for name, module in {**package, tv_f.__name__: tv_f}.items():
                import_only.setitem(sys.modules, name, module)
            module = importlib.import_module(_HF_VIDEO_MODULE)
        mp.setattr(backends, "tvF", tv_f, raising=False)
        mp.setattr(video_utils, "tvF", tv_f, raising=False)
        mp.setattr(backends, "pil_torch_interpolation_mapping",
                   {PILImageResampling.BICUBIC: _InterpolationMode.BICUBIC})
        try:
            yield module
        finally:
            # The module holds the stand-in: later tests must not find it.
            sys.modules.pop(_HF_VIDEO_MODULE, None)
            parent.__dict__.pop(_HF_VIDEO_MODULE.rpartition(".")[2], None)


@dataclass
class Clip:
    """Stand-in for server.multimodal's VideoFrames: the processor reads .frames and .fps."""

    frames: np.ndarray  # uint8 [N, H, W, 3]
    fps: float = 2.0


def clip(num_frames: int, height: int, width: int, seed: int) -> np.ndarray:
    # A gradient that moves between frames, plus noise: frames differ and resize sees edges.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([(xx * 255 // max(width - 1, 1) + 17 * t) % 256,
                  yy * 255 // max(height - 1, 1),
                  (xx + yy + 9 * t) % 256], -1)
        for t in range(num_frames)
    ]
    noisy = np.stack(frames) + rng.integers(-40, 41, size=(num_frames, height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl_video"))


def _hf_video_processor(hf_video, source, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source is None:
            return hf_video.Qwen2VLVideoProcessor(**kwargs)
        return hf_video.Qwen2VLVideoProcessor.from_pretrained(source, **kwargs)


# (checkpoint config or None for class defaults, overrides for both sides, clip shapes (N, H, W))
PIXEL_CASES = {
    "checkpoint_limits_even_odd_and_two_sizes": (True, {}, [(4, 48, 64), (6, 70, 100), (5, 70, 100)]),
    "class_defaults_upscale_small_clip": (False, {}, [(4, 48, 64)]),
    "cap_pixels_per_frame_shrinks_frames": (
        True, {"cap_pixels_per_frame": True, "max_video_tokens": 20}, [(6, 70, 100)]
    ),
}


@pytest.mark.parametrize("case", sorted(PIXEL_CASES))
def test_pixel_values_and_grid_equal_transformers_video_processor(case: str, hf_video, tiny_dir: Path) -> None:
    from_checkpoint, overrides, shapes = PIXEL_CASES[case]
    clips = [clip(*shape, seed=i) for i, shape in enumerate(shapes)]
    hf = _hf_video_processor(hf_video, tiny_dir if from_checkpoint else None, **overrides)
    expected = hf(videos=clips, return_tensors="pt")
    config = read_video_preprocessor_config(tiny_dir) if from_checkpoint else {}
    ours = Qwen2VLVideoProcessor.from_config(config, overrides)

    results = [ours.preprocess(frames) for frames in clips]
    grids = torch.tensor([grid for _, grid in results])
    assert torch.equal(grids, expected["video_grid_thw"])
    assert grids[:, 0].tolist() == [-(-n // 2) for n, _, _ in shapes]  # odd counts padded to even
    got = torch.cat([values for values, _ in results])
    assert got.dtype == torch.float32 and got.shape == expected["pixel_values_videos"].shape
    # Same kernels and float32 arithmetic as the reference: bit-identical.
    assert torch.equal(got, expected["pixel_values_videos"])
    if overrides.get("cap_pixels_per_frame"):
        uncapped = Qwen2VLVideoProcessor.from_config(config)
        assert all(ours.num_tokens(*s) < uncapped.num_tokens(*s) for s in shapes)  # the cap binds here


def test_video_settings_are_found_where_transformers_looks(hf_video, tiny_dir: Path, tmp_path: Path) -> None:
    def both(directory: Path) -> tuple[tuple[int, int], tuple[int, int]]:
        ours = Qwen2VLVideoProcessor.from_config(read_video_preprocessor_config(directory))
        hf = _hf_video_processor(hf_video, directory)
        return (ours.min_pixels, ours.max_pixels), (hf.size["shortest_edge"], hf.size["longest_edge"])

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    image_config = json.loads((tiny_dir / "preprocessor_config.json").read_text())
    (ckpt / "preprocessor_config.json").write_text(json.dumps(image_config))
    ours, hf = both(ckpt)
    assert ours == hf == (image_config["min_pixels"], image_config["max_pixels"])  # published layout

    (ckpt / "video_preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 4 * 784, "longest_edge": 64 * 784}, "max_pixels": 48 * 784})
    )
    ours, hf = both(ckpt)
    assert ours == hf == (4 * 784, 48 * 784)  # top-level max_pixels wins over size

    (ckpt / "processor_config.json").write_text(
        json.dumps({"video_processor": {"size": {"shortest_edge": 8 * 784, "longest_edge": 32 * 784}}})
    )
    ours, hf = both(ckpt)
    assert ours == hf == (8 * 784, 32 * 784)


class _HFProcessor(HFQwen2VLProcessor):
    """transformers' Qwen2VLProcessor; the class check of the video processor needs torchvision's
    auto-class mapping, so it is skipped for that one argument."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def hf(hf_video, tiny_dir: Path):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = _HFProcessor(
            image_processor=Qwen2VLImageProcessorPil.from_pretrained(tiny_dir),
            tokenizer=tok,
            video_processor=_hf_video_processor(hf_video, tiny_dir),
            chat_template=tok.chat_template,
        )
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_dir).eval()
    return processor, model


@pytest.fixture(scope="module")
def ours(tiny_dir: Path) -> Qwen2VLProcessor:
    return Qwen2VLProcessor(tiny_dir, json.loads((tiny_dir / "config.json").read_text()))


def _user(*parts: str) -> dict:
    content = [{"type": p} if p in ("image", "video") else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


# (conversation, image sizes (H, W), clip shapes (N, H, W)). At the tiny checkpoint's limits a
# 48x64 clip is 2x2 merged tokens per temporal patch, so 10 frames (grid_t 5) make the text
# after it depend on transformers 5.24's rule (start + max(rows, cols), not max(t, rows, cols)).
PROMPT_CASES = {
    "video_only": ([_user("video", "What happens?")], [], [(4, 48, 64)]),
    "video_image_video_interleaved": (
        [_user("First", "video", "then", "image", "and", "video", "Compare.")],
        [(90, 120)],
        [(6, 70, 100), (5, 48, 64)],
    ),
    "image_then_long_video_then_text": (
        [_user("image", "video", "Is the picture in the clip?")], [(60, 200)], [(10, 48, 64)]
    ),
    "multi_turn_video_then_image": (
        [
            _user("video", "Describe."),
            {"role": "assistant", "content": "A moving gradient."},
            _user("And this?", "image"),
        ],
        [(56, 56)],
        [(4, 70, 100)],
    ),
}


@pytest.mark.parametrize("case", sorted(PROMPT_CASES))
def test_prompt_ids_items_and_mrope_match_transformers(case: str, ours: Qwen2VLProcessor, hf) -> None:
    conversation, image_sizes, clip_shapes = PROMPT_CASES[case]
    images = [image(h, w, seed=i) for i, (h, w) in enumerate(image_sizes)]
    clips = [clip(*shape, seed=10 + i) for i, shape in enumerate(clip_shapes)]
    hf_processor, hf_model = hf

    text = hf_processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    expected = hf_processor(text=[text], images=images or None, videos=clips or None, return_tensors="pt")
    got = ours.render_chat(conversation, images, videos=[Clip(frames) for frames in clips])

    assert got.prompt_text == text
    assert got.prompt_token_ids == expected["input_ids"][0].tolist()

    # Items in prompt order, each covering exactly its modality's run of pad tokens.
    token_type = expected["mm_token_type_ids"][0]  # 0 text, 1 image, 2 video
    covered = torch.zeros_like(token_type)
    offsets = [item.offset for item in got.mm_items]
    assert offsets == sorted(offsets)
    for item in got.mm_items:
        code = {"image": 1, "video": 2}[item.modality]
        assert item.length == np.prod(item.data["grid_thw"]) // 4
        assert (token_type[item.offset : item.offset + item.length] == code).all()
        covered[item.offset : item.offset + item.length] = code
    assert torch.equal(covered, token_type)

    by_modality = {m: [it for it in got.mm_items if it.modality == m] for m in ("image", "video")}
    assert len(by_modality["image"]) == len(images) and len(by_modality["video"]) == len(clips)
    for modality, values_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                           ("video", "pixel_values_videos", "video_grid_thw")):
        if by_modality[modality]:
            grids = torch.tensor([it.data["grid_thw"] for it in by_modality[modality]])
            assert torch.equal(grids, expected[grid_key])
            values = torch.cat([qwen2_vl_pixel_values(it) for it in by_modality[modality]])
            assert torch.equal(values, expected[values_key])

    hf_positions, hf_delta = hf_model.model.get_rope_index(
        expected["input_ids"],
        expected["mm_token_type_ids"],
        image_grid_thw=expected.get("image_grid_thw"),
        video_grid_thw=expected.get("video_grid_thw"),
    )
    assert got.mrope_positions.dtype == np.int64
    assert np.array_equal(got.mrope_positions, hf_positions[:, 0].numpy())
    assert got.mrope_delta == int(hf_delta[0, 0])


def test_text_after_a_long_video_resumes_past_its_rows_and_cols_not_its_frames() -> None:
    # 1 text token, a 3x4x4 grid (3 temporal patches of 2x2 merged tokens), 2 text tokens.
    ids = [1] + [9] * 12 + [3, 4]
    positions, delta = mrope_positions(ids, [(1, 12, (3, 4, 4))], merge_size=2)
    assert positions[0, 1:13].tolist() == [1] * 4 + [2] * 4 + [3] * 4
    assert positions[1, 1:13].tolist() == [1, 1, 2, 2] * 3
    assert positions[2, 1:13].tolist() == [1, 2, 1, 2] * 3
    assert positions[:, 13:].tolist() == [[3, 4]] * 3  # 1 + max(2, 2), not 1 + max(3, 2, 2)
    assert delta == 5 - 15


def test_video_count_mismatch_and_empty_clip_are_clear_value_errors(ours: Qwen2VLProcessor) -> None:
    one_video = [_user("video", "What happens?")]
    with pytest.raises(ValueError, match=r"1 video placeholder\(s\).*0 video\(s\)"):
        ours.render_chat(one_video, [])
    with pytest.raises(ValueError, match=r"1 video placeholder\(s\).*2 video\(s\)"):
        ours.render_chat(one_video, [], videos=[Clip(clip(2, 48, 64, 0)), Clip(clip(2, 48, 64, 1))])
    with pytest.raises(ValueError, match=r"0 video placeholder\(s\).*1 video\(s\)"):
        ours.render_chat([_user("image", "Hi")], [image(50, 50, 0)], videos=[Clip(clip(2, 48, 64, 0))])
    with pytest.raises(ValueError, match="video 0 has no frames"):
        ours.render_chat(one_video, [], videos=[Clip(np.zeros((0, 48, 64, 3), np.uint8))])
    with pytest.raises(ValueError, match="uint8 array"):
        ours.render_chat(one_video, [], videos=[Clip(clip(2, 48, 64, 0).astype(np.float32))])


def test_video_content_hash_tracks_frames_and_differs_from_an_image_of_the_same_frame(
    ours: Qwen2VLProcessor,
) -> None:
    conversation = [_user("video", "What happens?")]
    frames = clip(4, 48, 64, seed=3)
    first = ours.render_chat(conversation, [], videos=[Clip(frames)]).mm_items[0]
    again = ours.render_chat(conversation, [], videos=[Clip(frames.copy())]).mm_items[0]
    assert again.content_hash == first.content_hash
    changed = frames.copy()
    changed[-1, 0, 0, 0] ^= 0xFF
    assert ours.render_chat(conversation, [], videos=[Clip(changed)]).mm_items[0].content_hash != first.content_hash
    still = np.repeat(frames[:1], 2, axis=0)
    video_item = ours.render_chat(conversation, [], videos=[Clip(still)]).mm_items[0]
    image_item = ours.render_chat([_user("image", "What happens?")], [Image.fromarray(frames[0])]).mm_items[0]
    assert video_item.content_hash != image_item.content_hash  # never share an encoder-cache entry
    assert len(first.content_hash) == 64 and first.modality == "video"
