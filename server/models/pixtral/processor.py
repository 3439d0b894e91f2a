"""Pixtral's prompt processor: conversation + images → `ProcessedPrompt`, for both formats.

Each image becomes `rows` rows of `[IMG]` × cols, each row closed by `[IMG_BREAK]` except the
last, closed by `[IMG_END]` (rows x cols = its patch grid). One `MultiModalItem` covers the
whole run, rows * (cols + 1) tokens; `is_embed` is True exactly at the `[IMG]` positions,
which receive the encoder's rows in row-major order (the break/end tokens keep their own
embeddings, as in transformers and mistral-common).

- HF format: the checkpoint's chat template renders one `[IMG]` per image part; each is
  expanded as above (transformers' `PixtralProcessor`), images preprocessed like
  `PixtralImageProcessorPil`.
- Mistral format (params.json + tekken.json): mistral-common encodes the chat
  (`encode_chat_completion`), with our image encoder plugged in (see `mistral_format.py`).
Positions are plain 1-D (0..n-1). CPU only; runs off the event loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmserve.models.pixtral import mistral_format
from vlmserve.models.layers.pixels import uint8_tensor
from vlmserve.models.pixtral.image_processor import PixtralImageProcessor, mistral_resize_normalize
from vlmserve.models.tokenizer import encode_prompt, load_tokenizer, render_chat
from vlmserve.models.generation_defaults import sampling_defaults
from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def pixtral_pixel_values(item: MultiModalItem) -> torch.Tensor:
    """float32 [3, rows * P, cols * P]: an item's normalised pixels on the CPU, as
    `embed_multimodal` computes them on its device (before patchifying). For the HF format,
    bit-identical to transformers' `PixtralImageProcessor` output for the image."""
    data = item.data
    if "pixel_values" in data:
        return torch.as_tensor(data["pixel_values"])
    if "source_pixels" in data:
        rows, cols = data["patch_grid"]
        p, (mean, std) = data["patch_size"], data["mistral_norm"]
        return mistral_resize_normalize(uint8_tensor(np.asarray(data["source_pixels"])), rows * p, cols * p, mean, std)
    lut = np.asarray(data["lut"])
    pixels = np.asarray(data["pixels"])
    x = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for ch in range(3):
        np.take(lut[ch], pixels[..., ch], out=x[ch])
    return torch.from_numpy(x)


def image_layout(rows: int, cols: int, img: int, img_break: int, img_end: int) -> list[int]:
    """Token ids of one image's range: ([IMG] * cols + [IMG_BREAK]) * rows, last one [IMG_END]."""
    ids = ([img] * cols + [img_break]) * rows
    ids[-1] = img_end
    return ids


class PixtralProcessor:
    """Reads, for the HF format: the tokenizer files, preprocessor_config.json,
    processor_config.json, generation_config.json and config.json's image_token_index; for the
    Mistral format: tekken.json (and params.json, through the loader's `hf_config`)."""

    modalities = ("image",)  # what the API may send it (vlmserve.engine.client.EngineClient)

    def __init__(
        self,
        model_dir: str | Path,
        hf_config: dict[str, Any],
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        longest_edge: int | None = None,
    ) -> None:
        if min_pixels is not None or max_pixels is not None:
            raise ValueError(
                "--min-pixels / --max-pixels do not apply to Pixtral, which bounds images by their longest edge "
                "(the model's image_size, 1024 px for Pixtral-12B); leave them unset"
            )
        self.model_dir = Path(model_dir)
        self.mistral_format = "mistral_params" in hf_config
        self.generation_config: dict[str, Any] = {}
        if self.mistral_format:
            self._init_mistral(hf_config["mistral_params"], longest_edge)
        else:
            self._init_hf(hf_config, longest_edge)

    def _init_hf(self, hf_config: dict[str, Any], longest_edge: int | None) -> None:
        self.tokenizer = load_tokenizer(self.model_dir)
        preprocessor = _read_json(self.model_dir / "preprocessor_config.json")
        self.image_processor = PixtralImageProcessor.from_preprocessor_config(
            preprocessor, {"longest_edge": longest_edge}
        )
        names = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
        names.update({k: v for k, v in _read_json(self.model_dir / "processor_config.json").items() if k in names})
        ids = {}
        for key, token in names.items():
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == self.tokenizer.unk_token_id:
                raise ValueError(f"{self.model_dir}: the tokenizer has no {token} token; is this a Pixtral checkpoint?")
            ids[key] = int(token_id)
        configured = hf_config.get("image_token_index", hf_config.get("image_token_id"))
        if configured is not None and int(configured) != ids["image_token"]:
            raise ValueError(
                f"config.json image_token_index={configured} but the tokenizer maps {names['image_token']} to "
                f"{ids['image_token']}; the checkpoint's config and tokenizer do not belong together"
            )
        self.image_token_id, self.image_break_token_id, self.image_end_token_id = (
            ids["image_token"], ids["image_break_token"], ids["image_end_token"]
        )
        text = hf_config.get("text_config") or {}
        self.vocab_size = int(text.get("vocab_size", len(self.tokenizer)))
        self.generation_config = _read_json(self.model_dir / "generation_config.json")

    def _init_mistral(self, params: dict[str, Any], longest_edge: int | None) -> None:
        self.tokenizer = mistral_format.load_mistral_tokenizer(self.model_dir)
        self._mistral = self.tokenizer.tokenizer  # mistral-common's MistralTokenizer
        tekken = self._mistral.instruct_tokenizer.tokenizer
        image_config = tekken.image
        vision = params.get("vision_encoder") or {}
        if image_config is None:
            raise ValueError(f"{self.model_dir}/tekken.json has no image section: not a Pixtral tokenizer")
        if vision.get("patch_size", image_config.image_patch_size) != image_config.image_patch_size:
            raise ValueError(
                f"params.json patch_size {vision.get('patch_size')} differs from tekken.json's image_patch_size "
                f"{image_config.image_patch_size}"
            )
        self.image_processor = PixtralImageProcessor(
            mode="mistral",
            patch_size=image_config.image_patch_size,
            longest_edge=longest_edge or image_config.max_image_size,
        )
        self.image_token_id = int(vision.get("image_token_id", tekken.get_special_token("[IMG]")))
        self.image_break_token_id = int(vision.get("image_break_token_id", tekken.get_special_token("[IMG_BREAK]")))
        self.image_end_token_id = int(vision.get("image_end_token_id", tekken.get_special_token("[IMG_END]")))
        mistral_format.install_image_encoder(self._mistral, self.image_processor, self._special_ids)
        self.vocab_size = int(params.get("vocab_size", tekken.n_words))

    @property
    def _special_ids(self) -> tuple[int, int, int]:
        return self.image_token_id, self.image_break_token_id, self.image_end_token_id

    @property
    def eos_token_ids(self) -> list[int]:
        """generation_config.json's eos_token_id (int or list), then the tokenizer's eos."""
        if self.mistral_format:
            return [int(self._mistral.instruct_tokenizer.tokenizer.eos_id)]
        configured = self.generation_config.get("eos_token_id")
        ids = configured if isinstance(configured, list) else [configured]
        ids = [*ids, self.tokenizer.eos_token_id]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    def generation_defaults(self) -> dict[str, Any]:
        """From generation_config.json (HF format); the Mistral format ships none: {}."""
        return {} if self.mistral_format else sampling_defaults(self.generation_config)

    def render_chat(
        self,
        conversation: list[dict[str, Any]],
        images: list[Image.Image],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> ProcessedPrompt:
        """`images` in the order of the image parts. Items come out in prompt order."""
        if self.mistral_format:
            kwargs = dict(chat_template_kwargs or {})
            tools = kwargs.pop("tools", None)  # the one kwarg mistral-common takes (the tool route sets it)
            if kwargs:
                raise ValueError("chat_template_kwargs do not apply to Mistral-format checkpoints (no chat template)")
            ids, arrays = mistral_format.encode_chat(self._mistral, conversation, images, add_generation_prompt, tools)
            items = self._items_from_layout(ids, [np.asarray(a) for a in arrays])
            return ProcessedPrompt(prompt_token_ids=ids, mm_items=items, prompt_text=None)

        text = render_chat(self.tokenizer, conversation, add_generation_prompt, chat_template_kwargs)
        ids = encode_prompt(self.tokenizer, text)
        placeholders = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(placeholders) != len(images):
            raise ValueError(
                f"the conversation has {len(placeholders)} image placeholder(s) after applying the chat template "
                f"but {len(images)} image(s) were given; send one image part per image"
            )
        prompt_ids: list[int] = []
        items: list[MultiModalItem] = []
        cursor = 0
        for placeholder, image in zip(placeholders, images):
            prompt_ids.extend(ids[cursor:placeholder])
            pixels, (rows, cols) = self.image_processor.resize(image)
            layout = image_layout(rows, cols, *self._special_ids)
            items.append(self._item(len(prompt_ids), layout, pixels, (rows, cols)))
            prompt_ids.extend(layout)
            cursor = placeholder + 1
        prompt_ids.extend(ids[cursor:])
        return ProcessedPrompt(prompt_token_ids=prompt_ids, mm_items=items, prompt_text=text)

    def _item(self, offset: int, layout: list[int], pixels: np.ndarray, grid: tuple[int, int]) -> MultiModalItem:
        """HF format: `pixels` uint8 [rows * P, cols * P, 3], shipped with the table (`lut`).
        Mistral format: the uint8 source `source_pixels` [H, W, 3] with the normalisation's
        mean and std (`mistral_norm`), or float32 `pixel_values` [3, rows * P, cols * P]."""
        ip = self.image_processor
        if pixels.dtype != np.uint8:
            data = {"pixel_values": torch.from_numpy(pixels), "patch_grid": grid}
        elif self.mistral_format:
            data = {"source_pixels": pixels, "patch_grid": grid, "patch_size": ip.patch_size,
                    "mistral_norm": (ip.image_mean, ip.image_std)}
        else:
            data = {"pixels": pixels, "patch_grid": grid, "lut": ip.lut}
        return MultiModalItem(
            modality="image",
            content_hash=self.image_processor.content_hash(pixels),
            offset=offset,
            length=len(layout),
            data=data,
            is_embed=np.asarray(layout) == self.image_token_id,
        )

    def _items_from_layout(self, ids: list[int], arrays: list[np.ndarray]) -> list[MultiModalItem]:
        """Items of a prompt whose images are already laid out (mistral-common's output): the
        k-th image range starts at the k-th run of image tokens."""
        p = self.image_processor.patch_size
        items, cursor = [], 0
        image_ids = set(self._special_ids)
        for pv in arrays:
            if pv.dtype == np.uint8:  # the source [H, W, 3]
                grid = self.image_processor.patch_grid(pv.shape[0], pv.shape[1])
            else:  # the result [3, rows * P, cols * P]
                grid = (pv.shape[1] // p, pv.shape[2] // p)
            layout = image_layout(*grid, *self._special_ids)
            while cursor < len(ids) and ids[cursor] not in image_ids:
                cursor += 1
            if ids[cursor : cursor + len(layout)] != layout:
                raise RuntimeError(f"mistral-common's prompt has no {grid[0]}x{grid[1]} image layout at {cursor}")
            items.append(self._item(cursor, layout, pv, grid))
            cursor += len(layout)
        if any(t in image_ids for t in ids[cursor:]):
            raise RuntimeError("mistral-common's prompt has more image tokens than images")
        return items

    def render_completion(self, prompt: str | list[int]) -> ProcessedPrompt:
        """A raw text prompt (BOS added once, as the tokenizer does) or token ids."""
        if isinstance(prompt, str):
            if self.mistral_format:
                ids = list(self._mistral.instruct_tokenizer.tokenizer.encode(prompt, bos=True, eos=False))
            else:
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
        if any(t in self._special_ids for t in ids):
            raise ValueError(
                "a completion prompt may not contain [IMG], [IMG_BREAK] or [IMG_END]; use /v1/chat/completions for images"
            )
        return ProcessedPrompt(prompt_token_ids=ids, prompt_text=text)
