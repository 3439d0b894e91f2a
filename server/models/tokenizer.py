"""Tokenizer loading, chat-template rendering and prompt encoding, shared by the families.

Follows transformers exactly, so that our prompts equal what `processor.apply_chat_template`
followed by the processor's tokenization produce:
- the chat template comes from, in order: the `chat_template` argument, `chat_template.jinja`
  (already loaded by `AutoTokenizer`), the processor-level `chat_template.json` (which wins over
  the tokenizer's, as in `ProcessorMixin`), then `tokenizer_config.json`;
- rendering is `tokenizer.apply_chat_template(..., tokenize=False)`;
- encoding adds the tokenizer's special tokens unless the rendered text already starts with the
  BOS string (`ProcessorMixin.apply_chat_template` does the same), so BOS is never doubled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer from local files only, with its chat template resolved."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist; pass a local checkpoint directory")
    try:
        # trust_remote_code=False: remote-code checkpoints (NVLM-D, Molmo) name their own config
        # classes in config.json's auto_map; without it transformers would ask on stdin.
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"could not load a tokenizer from {model_dir} (expected tokenizer.json or vocab files "
            f"with tokenizer_config.json): {exc}"
        ) from exc
    legacy = model_dir / LEGACY_CHAT_TEMPLATE_FILE
    if not (model_dir / CHAT_TEMPLATE_FILE).is_file() and legacy.is_file():
        template = json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
        if template:
            tokenizer.chat_template = template
    return tokenizer


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    chat_template_kwargs: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> str:
    """The prompt text of an HF-style conversation, rendered as transformers renders it."""
    if chat_template is None and not tokenizer.chat_template:
        raise ValueError(
            "this model has no chat template (none in tokenizer_config.json, chat_template.jinja or "
            "chat_template.json); use /v1/completions with a raw prompt instead"
        )
    kwargs = dict(chat_template_kwargs or {})
    for reserved in ("conversation", "tokenize", "add_generation_prompt", "chat_template"):
        if reserved in kwargs:
            raise ValueError(f"chat_template_kwargs may not set {reserved!r}")
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
    except TemplateError as exc:
        raise ValueError(f"the chat template rejected this conversation: {exc}") from exc
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a rendered prompt: the tokenizer's special tokens are added unless the text
    already starts with the BOS string (exactly one BOS either way, when the tokenizer has one)."""
    bos = tokenizer.bos_token
    add_special_tokens = not (bos is not None and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
