"""NVLM-D's prompt processor: conversation + images → `ProcessedPrompt`, exactly as the
official `NVLM_D_Model.chat()` builds and tokenizes its query.

The query (conversation.py's "chatml" template, MPT separator style; no newline after
`<|im_end|>`):
    <|im_start|>system\\n{system}<|im_end|>  then per message  {role}{text}<|im_end|>
    (a message with empty text adds its role only), then `<|im_start|>assistant\\n`,
with roles `<|im_start|>user\\n` / `<|im_start|>assistant\\n` and system "Answer the questions."
unless the conversation starts with a system message. The chat template of
tokenizer_config.json (Qwen2.5's) is not what the official code uses, and is not used here.

Where an image goes (the official `chat()` takes a question string with `<image>` marks):
- a user message's text that holds as many `<image>` marks as the message has images keeps
  them where they are;
- no marks, every image after all the text (OpenAI's usual [text, image]): `<image>\\n` per
  image, then the text, as `chat()` prepends `<image>\\n` to a question without a mark;
- otherwise each image part in place as `<image>\\n`, without the newline when the text that
  follows starts with whitespace (a question split at its marks: [image, "\\nQ"]).
Then each `<image>`, in order, becomes `<Image>` + (`<tile_k>` + `<|vision_pad|>` x 256 for the
grid's tiles, `<tile_global_thumbnail>` + pads for the last tile) + `</Image>`. The tile tags
are plain text (several BPE tokens each). The whole query is tokenized once, as `chat()` does.

An item covers its image's range from the first to the last `<|vision_pad|>`; `is_embed`
marks the pads (the tile tags between them keep their own embeddings). Item data (pickled to
the engine process, read-only): "tiles" uint8 [T, S, S, 3] (grid tiles row-major, then the
thumbnail), "lut" float32 [3, 256] (ToTensor + Normalize as a table). Positions are 1-D.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmserve.models.nvlm_d.config import NVLMDModelConfig
from vlmserve.models.nvlm_d.image_processor import NVLMDImageProcessor
from vlmserve.models.tokenizer import encode_prompt, load_tokenizer
from vlmserve.models.generation_defaults import sampling_defaults
from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt

IMAGE_MARK = "<image>"
IMG_CONTEXT_TOKEN = "<|vision_pad|>"
SYSTEM_MESSAGE = "Answer the questions."  # conversation.py, template "chatml"
SYSTEM_TEMPLATE = "<|im_start|>system\n{system_message}"
ROLES = {"user": "<|im_start|>user\n", "assistant": "<|im_start|>assistant\n"}
SEP = "<|im_end|>"


def image_tokens(num_tiles: int, tokens_per_tile: int) -> str:
    """The text one image of `num_tiles` tiles becomes (`chat()`'s tile tags)."""
    tags = [f"<tile_{i}>" for i in range(1, num_tiles)] + ["<tile_global_thumbnail>"]
    return "<Image>" + "".join(tag + IMG_CONTEXT_TOKEN * tokens_per_tile for tag in tags) + "</Image>"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _message_text(message: dict[str, Any], index: int) -> tuple[str, int]:
    """(text with `<image>` marks, images in the message) of one HF-style message."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or "", 0
    parts = list(content)
    images = sum(1 for p in parts if p.get("type") == "image")
    texts = [p.get("text", "") for p in parts if p.get("type") == "text"]
    if any(p.get("type") not in ("text", "image") for p in parts):
        kinds = sorted({str(p.get("type")) for p in parts} - {"text", "image"})
        raise ValueError(f"messages[{index}]: NVLM-D takes text and image parts only, got {', '.join(kinds)}")
    marks = sum(t.count(IMAGE_MARK) for t in texts)
    if images == 0 or marks == images:
        return "".join(texts), images
    if marks:
        raise ValueError(
            f"messages[{index}]: its text has {marks} {IMAGE_MARK} mark(s) but the message has {images} image(s); "
            f"write one {IMAGE_MARK} per image, or none to place them automatically"
        )
    kinds = [p.get("type") for p in parts]
    last_text = max((i for i, k in enumerate(kinds) if k == "text"), default=-1)
    if last_text >= 0 and kinds.index("image") > last_text:
        # Every image after all the text (OpenAI's usual [text, image]): images first, as
        # chat() prepends "<image>\n" to a question without a mark.
        return (IMAGE_MARK + "\n") * images + "".join(texts), images
    out: list[str] = []
    for i, part in enumerate(parts):
        if part.get("type") == "text":
            out.append(part.get("text", ""))
            continue
        # In place; the "\n" chat()'s prefix has, unless the text that follows starts with
        # whitespace of its own (a question split at its marks: "<image>\nQ" -> [image, "\nQ"]).
        nxt = parts[i + 1] if i + 1 < len(parts) else None
        spaced = nxt is not None and nxt.get("type") == "text" and nxt.get("text", "")[:1].isspace()
        out.append(IMAGE_MARK if spaced else IMAGE_MARK + "\n")
    return "".join(out), images


def build_query(conversation: list[dict[str, Any]], add_generation_prompt: bool = True) -> tuple[str, int]:
    """(the official query text with one `<image>` mark per image, number of images)."""
    system = SYSTEM_MESSAGE
    messages: list[tuple[str, str]] = []
    num_images = 0
    for i, message in enumerate(conversation):
        role = message.get("role")
        text, images = _message_text(message, i)
        num_images += images
        if role == "system":
            if i != 0:
                raise ValueError(f"messages[{i}]: a system message must come first (NVLM-D's template has one)")
            system = text
            continue
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: role {role!r} is not supported; use system, user or assistant")
        messages.append((ROLES[role], text))
    if add_generation_prompt:
        messages.append((ROLES["assistant"], ""))
    query = SYSTEM_TEMPLATE.format(system_message=system) + SEP
    for role, text in messages:
        query += role + text + SEP if text else role
    return query, num_images


class NVLMDProcessor:
    """Reads the tokenizer files and config.json's tiling settings."""

    modalities = ("image",)  # what the API may send it (vlmserve.engine.client.EngineClient)
    # `chat()` returns `response.strip()`: the served text is stripped the same way.
    strips_output_whitespace = True

    def __init__(
        self, model_dir: str | Path, hf_config: dict[str, Any], min_pixels: int | None = None, max_pixels: int | None = None
    ) -> None:
        if min_pixels is not None or max_pixels is not None:
            raise ValueError(
                "--min-pixels / --max-pixels do not apply to NVLM-D, which tiles images into 1 to max_dynamic_patch "
                "tiles of 448 px (config.json); leave them unset"
            )
        self.model_dir = Path(model_dir)
        self.config = NVLMDModelConfig.from_hf_config(hf_config)
        self.tokenizer = load_tokenizer(self.model_dir)
        c = self.config
        # The model card's `load_image(image, input_size=448, max_num=6)`: max_num is config.json's
        # max_dynamic_patch (6 in NVLM-D-72B); min_num (1) and use_thumbnail (True) are fixed
        # there (as are its ImageNet mean/std), so min_dynamic_patch, use_thumbnail, dynamic_image_size
        # and preprocessor_config.json are not read.
        self.image_processor = NVLMDImageProcessor(
            image_size=c.image_size,
            min_num=1,
            max_num=c.max_dynamic_patch,
            use_thumbnail=True,
        )  # ImageNet mean/std, as the card's build_transform hard-codes them
        self.tokens_per_tile = c.tokens_per_tile
        token_id = self.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"{self.model_dir}: the tokenizer has no {IMG_CONTEXT_TOKEN} token; is this NVLM-D?")
        self.image_token_id = int(token_id)
        self.vocab_size = c.vocab_size
        self.generation_config = _read_json(self.model_dir / "generation_config.json")

    @property
    def eos_token_ids(self) -> list[int]:
        """`<|im_end|>` (chat() sets eos to the template's separator), then generation_config's."""
        configured = self.generation_config.get("eos_token_id")
        ids = [self.tokenizer.convert_tokens_to_ids(SEP), *(configured if isinstance(configured, list) else [configured])]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    def generation_defaults(self) -> dict[str, Any]:
        return sampling_defaults(self.generation_config)

    def render_chat(
        self,
        conversation: list[dict[str, Any]],
        images: list[Image.Image],
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> ProcessedPrompt:
        """`images` in the order of the image parts. Items come out in prompt order."""
        if chat_template_kwargs:
            raise ValueError("chat_template_kwargs do not apply to NVLM-D, whose prompt is built as its chat() builds it")
        query, num_images = build_query(conversation, add_generation_prompt)
        if num_images != len(images):
            raise ValueError(f"the conversation has {num_images} image part(s) but {len(images)} image(s) were given")
        all_tiles = [self.image_processor.tiles(image) for image in images]
        for tiles in all_tiles:
            if IMAGE_MARK not in query:
                raise ValueError(f"the conversation has fewer {IMAGE_MARK} marks than images")
            query = query.replace(IMAGE_MARK, image_tokens(tiles.shape[0], self.tokens_per_tile), 1)
        ids = encode_prompt(self.tokenizer, query)
        pads = np.flatnonzero(np.asarray(ids) == self.image_token_id)
        expected = sum(t.shape[0] for t in all_tiles) * self.tokens_per_tile
        if len(pads) != expected:
            raise ValueError(
                f"the prompt has {len(pads)} {IMG_CONTEXT_TOKEN} tokens but its images need {expected}; "
                f"do not write {IMG_CONTEXT_TOKEN} in the text"
            )
        items, cursor = [], 0
        for tiles in all_tiles:
            n = tiles.shape[0] * self.tokens_per_tile
            first, last = int(pads[cursor]), int(pads[cursor + n - 1])
            is_embed = np.zeros(last - first + 1, dtype=bool)
            is_embed[pads[cursor : cursor + n] - first] = True
            items.append(
                MultiModalItem(
                    modality="image",
                    content_hash=self.image_processor.content_hash(tiles),
                    offset=first,
                    length=last - first + 1,
                    data={"tiles": tiles, "lut": self.image_processor.lut_array},
                    is_embed=is_embed,
                )
            )
            cursor += n
        return ProcessedPrompt(prompt_token_ids=ids, mm_items=items, prompt_text=query)

    def render_completion(self, prompt: str | list[int]) -> ProcessedPrompt:
        """A raw text prompt (tokenized as `chat()` tokenizes its query) or token ids."""
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
        if self.image_token_id in ids:
            raise ValueError(f"a completion prompt may not contain {IMG_CONTEXT_TOKEN}; use /v1/chat/completions for images")
        return ProcessedPrompt(prompt_token_ids=ids, prompt_text=text)
