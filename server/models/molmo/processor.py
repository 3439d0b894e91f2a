"""Molmo v1's prompt processor: conversation + images → `ProcessedPrompt`, as the official
`MolmoProcessor.process(images=..., text=...)` builds it (default kwargs).

Official layout, for one image and text t:
    BOS, <im_start> (12 x (12 <im_patch> <im_col>)) <im_end>   (the global crop)
         <im_start> (R x (C <im_patch> <im_col>)) <im_end>     (the high-res crops)
         tokens(" User: " + t + " Assistant:")
BOS is the tokenizer's bos, or its eos when it has none (Qwen2: `<|endoftext|>`); the text is
encoded without special tokens; the tokenizer's chat template is not used. Text-only: BOS and
the text tokens.

Beyond what the official processor takes (one image, one text), chats map onto the same form:
- the text parts of a message are joined with a space;
- turns alternate " User: {text}" and " Assistant: {text}", and the prompt ends with
  " Assistant:" (the official " User: {t} Assistant:" for a single turn);
- every image goes at the start, in order (the official code only inserts images at the
  start), each with its own blocks and features;
- a system message is refused: the official format has no system role.

Each image is one `MultiModalItem` over its two blocks; `is_embed` marks its `<im_patch>`
positions (the model adds the image features to their embeddings). `data` (CPU, picklable,
read-only) holds "pixels" (the decoded uint8 image [H, W, 3]), "plan" (the resize spans, crop
origins, padding masks and feature→row map of `MolmoImageProcessor.plan`), "processor" (its
settings) and "patch_token_id"; the model resizes, normalises and patchifies on its device.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmserve.models.molmo.config import ADDITIONAL_VOCAB_SIZE
from vlmserve.models.molmo.image_processor import MolmoImageProcessor
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from vlmserve.models.generation_defaults import sampling_defaults
from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt

IMAGE_TOKENS = {"im_start": "<im_start>", "im_end": "<im_end>", "im_patch": "<im_patch>", "im_col": "<im_col>",
                "image": "<|image|>"}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_molmo_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer from its files. trust_remote_code=False: the remote-code
    format's tokenizer_config.json names an `auto_map` processor, for which transformers
    would otherwise stop and ask on stdin; the tokenizer itself is a plain Qwen2 one."""
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load a tokenizer from {model_dir}: {exc}") from exc


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(part.get("text", "") for part in content if part.get("type") == "text")


def conversation_text(conversation: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The text the official processor tokenizes: " User: {q} Assistant:" (one turn), turns
    chained as " User: {q} Assistant: {a} User: {q2} Assistant:"."""
    parts = []
    for i, message in enumerate(conversation):
        role = message.get("role")
        if role == "system":
            raise ValueError("Molmo's prompt format has no system role; put the instructions in the user message")
        if role not in ("user", "assistant"):
            raise ValueError(f"message {i} has role {role!r}; Molmo takes user and assistant messages")
        parts.append(("User: " if role == "user" else "Assistant: ") + _text_of(message))
    if add_generation_prompt and (not conversation or conversation[-1].get("role") != "assistant"):
        parts.append("Assistant:")
    return " " + " ".join(parts)


class MolmoProcessor:
    """Reads the tokenizer files, tokenizer_config.json (image settings, as the official
    processor merges them), generation_config.json and config.json's embedding_size."""

    modalities = ("image",)

    def __init__(
        self, model_dir: str | Path, hf_config: dict[str, Any], min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        if min_pixels is not None or max_pixels is not None:
            raise ValueError(
                "--min-pixels / --max-pixels do not apply to Molmo, which tiles every image into at most "
                "max_crops (12) crops of 336x336; leave them unset"
            )
        self.model_dir = Path(model_dir)
        self.tokenizer = load_molmo_tokenizer(self.model_dir)
        self.image_processor = MolmoImageProcessor.from_tokenizer_config(
            _read_json(self.model_dir / "tokenizer_config.json")
        )
        ids = self.tokenizer.encode("".join(IMAGE_TOKENS.values()), add_special_tokens=False)
        if len(ids) != len(IMAGE_TOKENS):
            raise ValueError(f"{self.model_dir}: the tokenizer lacks Molmo's image tokens {list(IMAGE_TOKENS.values())}")
        self.token_ids = dict(zip(IMAGE_TOKENS, ids))
        bos = self.tokenizer.bos_token_id or self.tokenizer.eos_token_id
        if bos is None:
            raise ValueError(f"{self.model_dir}: the tokenizer has neither a bos nor an eos token")
        self.bos_token_id = int(bos)
        embedding = hf_config.get("embedding_size") or hf_config.get("vocab_size") or len(self.tokenizer)
        self.vocab_size = int(embedding) + ADDITIONAL_VOCAB_SIZE  # rows of the embedding table
        self.generation_config = _read_json(self.model_dir / "generation_config.json")

    @property
    def eos_token_ids(self) -> list[int]:
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
    ) -> ProcessedPrompt:
        if chat_template_kwargs:
            raise ValueError("chat_template_kwargs do not apply to Molmo (its prompt format is fixed, no chat template)")
        parts = sum(1 for m in conversation if isinstance(m.get("content"), list)
                    for p in m["content"] if p.get("type") == "image")
        if parts != len(images):
            raise ValueError(f"the conversation has {parts} image part(s) but {len(images)} image(s) were given")
        text = conversation_text(conversation, add_generation_prompt)
        prompt_ids = [self.bos_token_id]
        items = []
        for image in images:
            item = self._image_item(image, offset=len(prompt_ids))
            prompt_ids.extend(item.data["plan"]["tokens"].tolist())
            items.append(item)
        prompt_ids.extend(self.tokenizer.encode(text, add_special_tokens=False))
        return ProcessedPrompt(prompt_token_ids=prompt_ids, mm_items=items, prompt_text=text)

    def _image_item(self, image: Image.Image, offset: int) -> MultiModalItem:
        ip = self.image_processor
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixels = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
        plan = ip.plan(pixels.shape[0], pixels.shape[1], self.token_ids)
        tokens = plan["tokens"]
        return MultiModalItem(
            modality="image",
            content_hash=ip.content_hash(pixels),
            offset=offset,
            length=len(tokens),
            data={"pixels": pixels, "plan": plan, "processor": ip, "patch_token_id": self.token_ids["im_patch"]},
            is_embed=tokens == self.token_ids["im_patch"],
        )

    def render_completion(self, prompt: str | list[int]) -> ProcessedPrompt:
        """A raw text prompt (BOS, then its tokens, as the official processor prefixes every
        sequence) or token ids (taken as they are)."""
        if isinstance(prompt, str):
            ids = [self.bos_token_id, *self.tokenizer.encode(prompt, add_special_tokens=False)]
            text: str | None = prompt
        else:
            ids = [int(i) for i in prompt]
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
            text = None
        if not ids:
            raise ValueError("the prompt is empty")
        image_ids = set(self.token_ids.values())
        if any(t in image_ids for t in ids):
            raise ValueError(
                "a completion prompt may not contain <im_start>, <im_end>, <im_patch>, <im_col> or <|image|>; "
                "use /v1/chat/completions for images"
            )
        return ProcessedPrompt(prompt_token_ids=ids, prompt_text=text)
