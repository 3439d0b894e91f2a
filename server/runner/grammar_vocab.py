"""A checkpoint's tokenizer → xgrammar's `TokenizerInfo` (the token byte strings the grammar
matcher reasons over). Runs in the engine-core process, on the grammar worker thread, once.

- HF tokenizers (Qwen2-VL, Llama 3.2, Pixtral HF, ...): `TokenizerInfo.from_huggingface`,
  which detects byte-level BPE / byte-fallback / raw vocabularies itself.
- Mistral-format Pixtral (`MistralCommonBackend` over tekken.json): tekken's pieces are raw
  bytes (`id_to_byte_piece`); its control tokens (<s>, [INST], [IMG], ...) become "" so the
  matcher never allows them (xgrammar treats empty tokens as special).

Logit columns past the tokenizer's ids (padding rows of an LM head) are masked by the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import xgrammar as xgr


def tokenizer_info(tokenizer: Any, stop_token_ids: Iterable[int]) -> xgr.TokenizerInfo:
    stops = sorted(set(int(t) for t in stop_token_ids))
    tekken = _tekken(tokenizer)
    if tekken is not None:
        num_special = tekken.num_special_tokens
        vocab: list[bytes] = [b"" if i < num_special else tekken.id_to_byte_piece(i) for i in range(tekken.n_words)]
        return xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=stops)
    return xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer), stop_token_ids=stops)


def _tekken(tokenizer: Any) -> Any | None:
    """mistral-common's Tekkenizer behind transformers' MistralCommonBackend, else None."""
    inner = getattr(getattr(tokenizer, "tokenizer", None), "instruct_tokenizer", None)
    tekken = getattr(inner, "tokenizer", None)
    return tekken if hasattr(tekken, "id_to_byte_piece") else None


def load_tokenizer_info(model_dir: Path, hf_config: dict[str, Any], stop_token_ids: Iterable[int]) -> xgr.TokenizerInfo:
    """The tokenizer the family's processor serves with (the same files, the same class)."""
    from vlmserve.models import registry

    processor = registry.family_for_config(hf_config).processor_class()(model_dir, hf_config)
    return tokenizer_info(processor.tokenizer, stop_token_ids)
