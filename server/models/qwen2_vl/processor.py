"""Qwen2-VL's prompt processor: conversation + images + videos -> `ProcessedPrompt`.

Reproduces transformers' `Qwen2VLProcessor` + `Qwen2VLModel.get_rope_index` (5.24):
- the chat template renders one `<|vision_start|><|image_pad|><|vision_end|>` per image part and
  one `<|vision_start|><|video_pad|><|vision_end|>` per video part;
- each pad token is expanded to grid_t * grid_h * grid_w / merge**2 copies (one per merged
  28x28 patch, per temporal patch of 2 frames for a video), the encoder rows it receives;
- M-RoPE positions [3, L]: text tokens advance all three axes together; an image's or video's
  tokens get (t, row, col) offsets from the position where it starts, and the text after it
  resumes at start + max(merged rows, merged cols). A token generated at sequence index i then
  has position i + mrope_delta on every axis (mrope_delta = max position + 1 - L).
CPU only; runs off the event loop (called through `AsyncEngine.render_chat`).

An item's `data` (pickled to the engine process: numpy arrays and plain tuples, which pickle
in microseconds, where a torch tensor costs a few hundred):
  "pixels":   uint8 [H, W, 3] for an image (its temporal patch repeats it), uint8
              [grid_t * tp, H, W, 3] for a video (resized, last frame repeated up to a multiple
              of tp); H = grid_h * patch_size, W = grid_w * patch_size;
  "grid_thw": (grid_t, grid_h, grid_w) ints;
  "lut":      float32 [3, 256], the rescale + normalise table of the item's processor (images
              and videos round differently; the model does not know the processor settings);
  "patchify": (patch_size, merge_size, temporal_patch_size).
The model normalises and patchifies on its device (`kernels.normalize_patchify`);
`qwen2_vl_pixel_values(item)` gives the same float rows on the CPU (transformers' inputs).
Read-only: several requests may share one item's arrays.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmserve.kernels import reference
from vlmserve.models.qwen2_vl.image_processor import Qwen2VLImageProcessor, uint8_tensor
from vlmserve.models.qwen2_vl.video_processor import Qwen2VLVideoProcessor, read_video_preprocessor_config
from vlmserve.models.tokenizer import encode_prompt, load_tokenizer, render_chat
from vlmserve.models.generation_defaults import sampling_defaults
from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt

_TOKEN_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_TOKEN_STRINGS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def mrope_positions(
    token_ids: list[int] | np.ndarray,
    vision_spans: list[tuple[int, int, tuple[int, int, int]]],
    merge_size: int,
) -> tuple[np.ndarray, int]:
    """M-RoPE positions for a prompt whose vision placeholders are already expanded.

    `vision_spans`: (offset, length, (grid_t, grid_h, grid_w)) per image/video, sorted by
    offset, with length == grid_t * grid_h * grid_w // merge_size**2. Temporal offsets are the
    temporal patch index (Qwen2-VL: no scaling by fps).
    Returns (positions int64 [3, L], mrope_delta = max position + 1 - L).
    """
    total = len(token_ids)
    positions = np.empty((3, total), dtype=np.int64)
    cursor = 0  # next prompt index to fill
    next_pos = 0  # position the next text token takes
    for offset, length, (grid_t, grid_h, grid_w) in vision_spans:
        llm_h, llm_w = grid_h // merge_size, grid_w // merge_size
        if offset < cursor or grid_t * llm_h * llm_w != length:
            raise ValueError(
                f"vision span at {offset} (length {length}, grid {grid_t}x{grid_h}x{grid_w}) overlaps the "
                f"previous one or does not match its grid"
            )
        text_len = offset - cursor
        positions[:, cursor:offset] = np.arange(next_pos, next_pos + text_len)
        start = next_pos + text_len
        t_idx, h_idx, w_idx = np.meshgrid(np.arange(grid_t), np.arange(llm_h), np.arange(llm_w), indexing="ij")
        positions[0, offset : offset + length] = t_idx.reshape(-1) + start
        positions[1, offset : offset + length] = h_idx.reshape(-1) + start
        positions[2, offset : offset + length] = w_idx.reshape(-1) + start
        # transformers 5.24 advances by max(rows, cols) only; the original Qwen2-VL code used max(t, rows, cols).
        next_pos = start + max(llm_h, llm_w)
        cursor = offset + length
    positions[:, cursor:] = np.arange(next_pos, next_pos + total - cursor)
    delta = int(positions.max()) + 1 - total if total else 0
    return positions, delta


def qwen2_vl_pixel_values(item: MultiModalItem) -> torch.Tensor:
    """float32 [grid_t * grid_h * grid_w, 3 * tp * p * p]: the normalised patch rows of one item,
    computed on the CPU as `embed_multimodal` computes them on its device. Bit-identical to
    transformers' `pixel_values` (images) / `pixel_values_videos` (videos) rows for the item."""
    data = item.data
    lut = torch.from_numpy(data["lut"] if data["lut"].flags.writeable else data["lut"].copy())
    return reference.normalize_patchify(uint8_tensor(data["pixels"]), lut, *data["patchify"])


def _check_count(modality: str, placeholders: int, given: int) -> None:
    if placeholders != given:
        raise ValueError(
            f"the conversation has {placeholders} {modality} placeholder(s) after applying the chat template "
            f"but {given} {modality}(s) were given; send one {modality} part per {modality}"
        )


class Qwen2VLProcessor:
    """Reads the checkpoint's tokenizer, preprocessor_config.json, generation_config.json and
    the vision token ids of config.json (flat, or nested under `text_config`)."""

    modalities = ("image", "video")  # what the API may send it (vlmserve.engine.client.EngineClient)

    def __init__(
        self,
        model_dir: str | Path,
        hf_config: dict[str, Any],
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        # Where transformers looks, in its order: processor_config.json's nested
        # "image_processor" (what transformers 5 saves), then preprocessor_config.json (the
        # published layout); neither: transformers' class defaults.
        nested = _read_json(self.model_dir / "processor_config.json") or {}
        preprocessor = nested.get("image_processor") or _read_json(self.model_dir / "preprocessor_config.json")
        self.image_processor = Qwen2VLImageProcessor.from_preprocessor_config(
            preprocessor, {"min_pixels": min_pixels, "max_pixels": max_pixels}
        )
        # Videos have their own settings (see video_processor.py); the --min/max-pixels flags
        # apply to images only, as transformers' image and video processors are separate.
        self.video_processor = Qwen2VLVideoProcessor.from_config(read_video_preprocessor_config(self.model_dir))
        if self.video_processor.merge_size != self.image_processor.merge_size:
            raise ValueError(
                f"{self.model_dir}: video merge_size {self.video_processor.merge_size} differs from the image "
                f"merge_size {self.image_processor.merge_size}; the vision tower has one spatial merge"
            )
        text_config = hf_config.get("text_config") or {}
        ids: dict[str, int] = {}
        for key in _TOKEN_ID_KEYS:
            from_config = hf_config.get(key, text_config.get(key))
            from_tokenizer = self.tokenizer.convert_tokens_to_ids(_TOKEN_STRINGS[key])
            if from_config is not None and from_tokenizer is not None and from_config != from_tokenizer:
                raise ValueError(
                    f"config.json {key}={from_config} but the tokenizer maps {_TOKEN_STRINGS[key]} to "
                    f"{from_tokenizer}; the checkpoint's config and tokenizer do not belong together"
                )
            value = from_config if from_config is not None else from_tokenizer
            if value is None:
                raise ValueError(
                    f"{self.model_dir}: no {key} in config.json and no {_TOKEN_STRINGS[key]} in the tokenizer"
                )
            ids[key] = int(value)
        self.image_token_id = ids["image_token_id"]
        self.video_token_id = ids["video_token_id"]
        self.vision_start_token_id = ids["vision_start_token_id"]
        self.vision_end_token_id = ids["vision_end_token_id"]
        self.vocab_size = int(hf_config.get("vocab_size", text_config.get("vocab_size", len(self.tokenizer))))
        self.generation_config = _read_json(self.model_dir / "generation_config.json")

    @property
    def eos_token_ids(self) -> list[int]:
        """generation_config.json's eos_token_id (int or list), then the tokenizer's eos."""
        configured = self.generation_config.get("eos_token_id")
        ids = configured if isinstance(configured, list) else [configured]
        ids = [*ids, self.tokenizer.eos_token_id]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    def generation_defaults(self) -> dict[str, Any]:
        return sampling_defaults(self.generation_config)

    def render_chat(
        self,
        conversation: list[dict[str, Any]],
        images: list[Image.Image],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        videos: list[Any] | None = None,
    ) -> ProcessedPrompt:
        """`images` in the order of the image parts; `videos` (objects with `.frames`, uint8
        [N, H, W, 3], and `.fps`) in the order of the video parts. Items come out in prompt order."""
        videos = list(videos or [])
        text = render_chat(self.tokenizer, conversation, add_generation_prompt, chat_template_kwargs)
        ids = np.asarray(encode_prompt(self.tokenizer, text), dtype=np.int64)
        is_image, is_video = ids == self.image_token_id, ids == self.video_token_id
        _check_count("image", int(is_image.sum()), len(images))
        _check_count("video", int(is_video.sum()), len(videos))
        image_iter, video_iter = iter(images), iter(enumerate(videos))
        prompt_ids: list[int] = []
        items: list[MultiModalItem] = []
        spans: list[tuple[int, int, tuple[int, int, int]]] = []
        cursor = 0
        for placeholder in np.flatnonzero(is_image | is_video).tolist():
            prompt_ids.extend(ids[cursor:placeholder].tolist())
            if is_image[placeholder]:
                item = self._image_item(next(image_iter), offset=len(prompt_ids))
            else:
                item = self._video_item(*next(video_iter), offset=len(prompt_ids))
            prompt_ids.extend([int(ids[placeholder])] * item.length)
            items.append(item)
            spans.append((item.offset, item.length, item.data["grid_thw"]))
            cursor = placeholder + 1
        prompt_ids.extend(ids[cursor:].tolist())
        positions, delta = mrope_positions(prompt_ids, spans, self.image_processor.merge_size)
        return ProcessedPrompt(
            prompt_token_ids=prompt_ids,
            mm_items=items,
            mrope_positions=positions,
            mrope_delta=delta,
            prompt_text=text,
        )

    def _image_item(self, image: Image.Image, offset: int) -> MultiModalItem:
        ip = self.image_processor
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = ip.resize(image)  # uint8 [H', W', 3]; a new array, never the caller's image
        grid = ip.grid(pixels)
        return MultiModalItem(
            modality="image",
            content_hash=ip.content_hash(pixels, grid, "image"),
            offset=offset,
            length=grid[0] * grid[1] * grid[2] // ip.merge_size**2,
            data={"pixels": pixels, "grid_thw": grid, "lut": ip.lut_array, "patchify": ip.patchify},
        )

    def _video_item(self, index: int, video: Any, offset: int) -> MultiModalItem:
        vp = self.video_processor
        frames = getattr(video, "frames", None)
        if frames is None:
            raise ValueError(
                f"video {index}: expected decoded frames (an object with .frames, uint8 [N, H, W, 3]), "
                f"got {type(video).__name__}"
            )
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise ValueError(f"video {index} has no frames (shape {frames.shape}); send a clip with at least one frame")
        resized = vp.resize(frames)  # uint8 [N, H', W', 3]; may be the (read-only) input itself
        padded = vp.pad_frames(resized)  # [grid_t * tp, H', W', 3]
        grid = vp.grid(padded)
        return MultiModalItem(
            modality="video",
            # Over the unpadded frames, as before: padding is a function of them.
            content_hash=vp.content_hash(resized, grid),
            offset=offset,
            length=grid[0] * grid[1] * grid[2] // vp.merge_size**2,
            data={"pixels": padded, "grid_thw": grid, "lut": vp.lut_array, "patchify": vp.patchify},
        )

    def render_completion(self, prompt: str | list[int]) -> ProcessedPrompt:
        """A raw text prompt (tokenized as transformers would, BOS never doubled) or token ids."""
        if isinstance(prompt, str):
            ids = encode_prompt(self.tokenizer, prompt)
            text: str | None = prompt
        else:
            ids = [int(i) for i in prompt]
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
            text = None
        if not ids:
            raise ValueError("the prompt is empty")
        if self.image_token_id in ids or self.video_token_id in ids:
            raise ValueError(
                "a completion prompt may not contain <|image_pad|> or <|video_pad|>; "
                "use /v1/chat/completions for images"
            )
        positions = np.broadcast_to(np.arange(len(ids), dtype=np.int64), (3, len(ids))).copy()
        return ProcessedPrompt(prompt_token_ids=ids, mrope_positions=positions, mrope_delta=0, prompt_text=text)
