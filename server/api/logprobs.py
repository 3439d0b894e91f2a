"""Engine `TokenLogprob`s → OpenAI logprobs objects (chat `content[]`, legacy completions).

A token's text is its own decoding and may be an incomplete UTF-8 character (shown with
U+FFFD); `bytes` then carries the exact bytes, recovered from the byte-level vocabulary
(GPT-2 style, Qwen2) or from `<0xNN>` byte-fallback pieces (SentencePiece), so that a
client can join consecutive tokens' bytes into the true text.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

from vlmserve.api.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprobEntry, TopLogprob
from vlmserve.engine.outputs import TokenLogprob

# OpenAI reports -inf as this value; JSON has no infinities.
MIN_LOGPROB = -9999.0
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes→printable-unicode table used by byte-level BPE vocabularies:
    printable Latin-1 bytes stand for themselves, the other 68 bytes map to chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table: dict[str, int] = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


def clamp_logprob(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) or value < MIN_LOGPROB else value


class TokenRenderer:
    """Token id → (text, bytes). `tokenizer` None (an engine without one): ids are shown as
    `token_id:<id>` (vLLM's `return_tokens_as_token_ids` form) and bytes are omitted."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self._byte_level = tokenizer is not None and _is_byte_level(tokenizer)
        self._cache: dict[int, tuple[str, list[int] | None]] = {}

    def render(self, token_id: int) -> tuple[str, list[int] | None]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._render(token_id)
        return cached

    def _render(self, token_id: int) -> tuple[str, list[int] | None]:
        if self.tokenizer is None:
            return f"token_id:{token_id}", None
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:  # out of the vocabulary
            return f"token_id:{token_id}", None
        raw: bytes | None = None
        if self._byte_level:
            table = _byte_level_decoder()
            if all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
        elif (m := _BYTE_PIECE.match(piece)) is not None:
            raw = bytes([int(m.group(1), 16)])
        if raw is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if piece.startswith("\u2581") and not text.startswith(" "):
                text = " " + text  # SentencePiece drops a lone piece's word-initial space
            raw = text.encode("utf-8")
        return raw.decode("utf-8", errors="replace"), list(raw)

    def chat_logprobs(self, entries: list[TokenLogprob], top_n: int) -> ChatLogprobs:
        content = []
        for entry in entries:
            token, raw = self.render(entry.token_id)
            top = []
            for tid, lp in entry.top[:top_n]:
                t, b = self.render(tid)
                top.append(TopLogprob(token=t, logprob=clamp_logprob(lp), bytes=b))
            content.append(TokenLogprobEntry(token=token, logprob=clamp_logprob(entry.logprob), bytes=raw,
                                             top_logprobs=top))
        return ChatLogprobs(content=content)

    def completion_logprobs(self, entries: list[TokenLogprob], top_n: int, text_offset: int) -> CompletionLogprobs:
        """`text_offset`: characters of completion text before the first entry."""
        out = CompletionLogprobs()
        for entry in entries:
            token, _ = self.render(entry.token_id)
            out.tokens.append(token)
            out.token_logprobs.append(clamp_logprob(entry.logprob))
            out.text_offset.append(text_offset)
            text_offset += len(token)
            # The legacy format always lists the sampled token among the top ones.
            top = {self.render(tid)[0]: clamp_logprob(lp) for tid, lp in entry.top[:top_n]}
            top.setdefault(token, clamp_logprob(entry.logprob))
            out.top_logprobs.append(top)
        return out
