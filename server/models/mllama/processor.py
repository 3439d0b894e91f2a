"""Mllama's prompt processor: conversation + images → `ProcessedPrompt`, as transformers'
`MllamaProcessor` (5.24) builds it.

- The checkpoint's chat template renders one `<|image|>` per image part; it starts with
  `<|begin_of_text|>`, so no second BOS is added (`tokenizer.encode_prompt`).
- Each `<|image|>` is one prompt token and one item: length 1, `is_embed` all False (the
  token keeps its own embedding), `cross_attn_tokens` = max_num_tiles * num_patches rows.

The request's cross-attention sequence (what `ranges` index) is laid out
    [real-tile rows of image 0, ..., of image K-1 | padded-tile rows of image 0, ..., K-1]
so that every token's attended set is one range (`cross_row_positions` maps each row of the
items' `embed_multimodal` outputs, concatenated in item order, to its position there).

`cross_ranges[t]` reproduces transformers' `cross_attention_mask`: image i is seen from its
token up to the next image token; consecutive `<|image|>` tokens form a group, each seen up to
the end of the group's span. A token thus sees a run of images j..m: its range is the real
rows of j..m. A token before the first image sees none: [0, 0), which the model computes as
attention over ALL rows, padded tiles included, with the cross MLP zeroed (transformers'
`full_text_row_masked_out_mask`). Generated tokens take the last prompt token's range (as
transformers extends the mask by repeating its last row).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import torch

from vlmserve.models.mllama.image_processor import MllamaImageProcessor, normalized_tiles
from vlmserve.models.tokenizer import encode_prompt, load_tokenizer, render_chat
from vlmserve.models.generation_defaults import sampling_defaults
from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt

IMAGE_TOKEN = "<|image|>"


def image_spans(token_ids: list[int] | np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of the prompt tokens that see each image, in image order (transformers'
    `get_cross_attention_token_mask` + its dense conversion)."""
    locs = [i for i, tok in enumerate(token_ids) if tok == image_token_id]
    ends = locs[1:] + [len(token_ids)]
    for i in range(len(locs) - 2, -1, -1):  # a group of consecutive images shares its last end
        if ends[i] == locs[i] + 1:
            ends[i] = ends[i + 1]
    return list(zip(locs, ends))


def cross_attention_ranges(
    token_ids: list[int] | np.ndarray, image_token_id: int, real_rows: list[int]
) -> np.ndarray:
    """int32 [L, 2]: per token, the [start, end) of the real rows it attends to in the layout
    of the module docstring ([0, 0): none). `real_rows[i]` = image i's num_tiles * num_patches."""
    spans = image_spans(token_ids, image_token_id)
    if len(spans) != len(real_rows):
        raise ValueError(f"{len(spans)} image tokens in the prompt but {len(real_rows)} images")
    ranges = np.zeros((len(token_ids), 2), dtype=np.int32)
    if not spans:
        return ranges
    offsets = np.concatenate([[0], np.cumsum(real_rows)]).astype(np.int64)
    sees = np.zeros((len(token_ids), len(spans)), dtype=bool)  # [L, images]
    for i, (start, end) in enumerate(spans):
        sees[start:end, i] = True
    any_image = sees.any(axis=1)
    first = np.argmax(sees, axis=1)
    last = len(spans) - 1 - np.argmax(sees[:, ::-1], axis=1)
    if not (sees.sum(axis=1) == np.where(any_image, last - first + 1, 0)).all():
        raise AssertionError("an attended image set is not a run of consecutive images")
    ranges[any_image, 0] = offsets[first[any_image]]
    ranges[any_image, 1] = offsets[last[any_image] + 1]
    return ranges


def cross_row_positions(real_rows: list[int], rows_per_image: int) -> np.ndarray:
    """int64 [K * rows_per_image]: the cross-sequence position of every row of the items'
    `embed_multimodal` outputs concatenated in item order (image i: real rows then padding)."""
    total_real = sum(real_rows)
    out, pad_offset, real_offset = [], total_real, 0
    for real in real_rows:
        out.append(np.arange(real_offset, real_offset + real))
        out.append(np.arange(pad_offset, pad_offset + rows_per_image - real))
        real_offset += real
        pad_offset += rows_per_image - real
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def item_real_rows(item: MultiModalItem, num_patches: int) -> int:
    return int(item.data["num_tiles"]) * num_patches


def mllama_pixel_values(item: MultiModalItem) -> torch.Tensor:
    """float32 [num_tiles, 3, tile, tile]: an item's normalised tiles on the CPU, as
    `embed_multimodal` computes them on its device; bit-identical to transformers'
    `pixel_values[..., :num_tiles]` for the image."""
    data = item.data
    return normalized_tiles(np.asarray(data["pixels"]), np.asarray(data["lut"]), *data["aspect_ratio"])


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class MllamaProcessor:
    """Reads the checkpoint's tokenizer (+ chat template), preprocessor_config.json,
    generation_config.json and config.json's vision sizes and image token."""

    modalities = ("image",)  # what the API may send it (vlmserve.engine.client.EngineClient)

    def __init__(self, model_dir: str | Path, hf_config: dict[str, Any], **_limits: Any) -> None:
        # `_limits` (min/max_pixels) do not apply: Mllama's images are always <= max tiles.
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.image_processor = MllamaImageProcessor.from_preprocessor_config(
            _read_json(self.model_dir / "preprocessor_config.json")
        )
        vision = hf_config.get("vision_config") or {}
        tile, patch = int(vision.get("image_size", 448)), int(vision.get("patch_size", 14))
        if tile != self.image_processor.tile_size:
            raise ValueError(
                f"preprocessor_config.json tiles are {self.image_processor.tile_size} px but the vision model's "
                f"image_size is {tile}; the checkpoint's files do not belong together"
            )
        self.num_patches = (tile // patch) ** 2 + 1
        self.max_num_tiles = int(vision.get("max_num_tiles", 4))
        if self.max_num_tiles != self.image_processor.max_image_tiles:
            raise ValueError(
                f"preprocessor max_image_tiles {self.image_processor.max_image_tiles} != vision max_num_tiles "
                f"{self.max_num_tiles}"
            )
        self.rows_per_image = self.max_num_tiles * self.num_patches
        configured = hf_config.get("image_token_index", hf_config.get("image_token_id"))
        from_tokenizer = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if configured is not None and from_tokenizer is not None and int(configured) != from_tokenizer:
            raise ValueError(
                f"config.json image_token_index={configured} but the tokenizer maps {IMAGE_TOKEN} to {from_tokenizer}"
            )
        self.image_token_id = int(configured if configured is not None else from_tokenizer)
        text = hf_config.get("text_config") or {}
        self.vocab_size = int(text.get("vocab_size", len(self.tokenizer)))
        self.generation_config = _read_json(self.model_dir / "generation_config.json")

    @property
    def eos_token_ids(self) -> list[int]:
        configured = self.generation_config.get("eos_token_id")
        ids = configured if isinstance(configured, list) else [configured]
        return list(dict.fromkeys(int(i) for i in [*ids, self.tokenizer.eos_token_id] if i is not None))

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
        """`images` in the order of the image parts."""
        if videos:
            raise ValueError("Llama 3.2 Vision does not take videos; send images")
        text = render_chat(self.tokenizer, conversation, add_generation_prompt, chat_template_kwargs)
        ids = encode_prompt(self.tokenizer, text)
        locs = [i for i, tok in enumerate(ids) if tok == self.image_token_id]
        if len(locs) != len(images):
            raise ValueError(
                f"the conversation has {len(locs)} image placeholder(s) after applying the chat template but "
                f"{len(images)} image(s) were given; send one image part per image"
            )
        items = [self._image_item(image, loc) for image, loc in zip(images, locs)]
        if not items:
            return ProcessedPrompt(prompt_token_ids=ids, prompt_text=text)
        real_rows = [item_real_rows(i, self.num_patches) for i in items]
        # Real tiles of all images first, padding rows last: every token's attended rows are
        # then one contiguous range (see cross_attention_ranges).
        return ProcessedPrompt(
            prompt_token_ids=ids,
            mm_items=items,
            prompt_text=text,
            cross_ranges=cross_attention_ranges(ids, self.image_token_id, real_rows),
            cross_row_positions=cross_row_positions(real_rows, items[0].cross_attn_tokens),
        )

    def _image_item(self, image: Image.Image, offset: int) -> MultiModalItem:
        ip = self.image_processor
        tiled = ip.preprocess(image)
        return MultiModalItem(
            modality="image",
            content_hash=ip.content_hash(tiled),
            offset=offset,
            length=1,
            data={
                "pixels": tiled.canvas,  # uint8 [rows * tile, cols * tile, 3], padded with level 0
                "lut": tiled.lut,
                "aspect_ratio": tiled.aspect_ratio,
                "aspect_ratio_id": tiled.aspect_ratio_id,
                "num_tiles": tiled.num_tiles,
            },
            is_embed=np.zeros(1, dtype=bool),
            cross_attn_tokens=self.rows_per_image,
        )

    def render_completion(self, prompt: str | list[int]) -> ProcessedPrompt:
        """A raw text prompt (one BOS, as `encode_prompt`) or token ids; no images."""
        if isinstance(prompt, str):
            ids, text = encode_prompt(self.tokenizer, prompt), prompt
        else:
            ids, text = [int(i) for i in prompt], None
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        if not ids:
            raise ValueError("the prompt is empty")
        if self.image_token_id in ids:
            raise ValueError(f"a completion prompt may not contain {IMAGE_TOKEN}; use /v1/chat/completions for images")
        return ProcessedPrompt(prompt_token_ids=ids, prompt_text=text)
