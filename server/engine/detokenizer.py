"""Incremental detokenization with stop strings, one instance per running request.

Owner: `AsyncEngine` creates one per request and feeds it the request's new token ids each
step; the text deltas it returns become `RequestOutput.text`.

Decoding uses two offsets into `token_ids` (prompt tail + outputs), as TGI and vLLM do:
- `prefix_offset`: start of a small window of already-emitted tokens, decoded again only as
  context (SentencePiece drops a word's leading space when the word is decoded alone);
- `read_offset`: first token whose text has not been emitted yet.
Each token costs two decodes of the window `[prefix_offset, len)`, which stays a few tokens
long; the output is never decoded in full again. While the window's text ends in U+FFFD
(a multi-byte character split over tokens) nothing is emitted and the window grows until
the character is complete.

Stop strings: decoded text first goes to `_pending`. A stop string found there ends the
request; otherwise everything is released except the longest suffix of `_pending` that is
a prefix of some stop string (at most `max(len(stop)) - 1` characters), because the next
tokens may complete it. `flush()` releases what is left when the request ends without a
stop string.

`strip_whitespace` (families whose official chat returns `response.strip()`, NVLM-D): the
text is streamed as if the whole answer were stripped: leading whitespace is dropped, and a
whitespace run is held back until text follows it (dropped if the answer ends there).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from vlmserve.engine.sampling_params import SamplingParams

# Prompt tokens kept as decoding context for the first output tokens.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


def _ids_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """ids -> text exactly as `tokenizer.decode(ids, skip_special_tokens=...,
    clean_up_tokenization_spaces=False)`. For transformers' fast tokenizers that is the Rust
    tokenizer's own decode, called directly: the Python wrapper costs 3x the decode itself,
    twice per streamed token."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - transformers without the tokenizers backend
        TokenizersBackend = None
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        TokenizersBackend is not None
        and isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._decode is TokenizersBackend._decode  # no subclass decodes otherwise
        and type(tokenizer).decode is TokenizersBackend.decode
        and hasattr(backend, "decode")
    ):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams, strip_whitespace: bool = False
    ) -> None:
        """`tokenizer`: a transformers tokenizer (anything with `decode(ids, skip_special_tokens=...,
        clean_up_tokenization_spaces=...)`)."""
        self.tokenizer = tokenizer
        self.params = params
        self._decode_ids = _ids_decoder(tokenizer, params.skip_special_tokens)
        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self.token_ids: list[int] = context  # prompt tail, then every output token
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.num_output_tokens = 0
        self.stop_reason: str | None = None  # the stop string that ended the request
        self._pending = ""  # decoded, checked for stop strings, not yet returned
        self._max_stop_len = max((len(s) for s in params.stop), default=0)
        self._strip = strip_whitespace
        self._started = False  # strip: some non-whitespace text was emitted
        self._held_ws = ""  # strip: trailing whitespace not yet known to be inside the answer

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    def update(self, new_token_ids: Sequence[int]) -> tuple[str, str | None]:
        """Adds a step's tokens; returns (text to emit now, the stop string if one matched).

        After a stop string matched, tokens that follow it (same call or later calls) add
        nothing: the request is over and the caller should finish it with reason "stop".
        """
        if self.finished:
            return "", None
        emitted: list[str] = []
        for token_id in new_token_ids:
            self.token_ids.append(token_id)
            self.num_output_tokens += 1
            piece = self._decode_next()
            # Stop strings are not matched before min_tokens tokens exist: text of those
            # tokens is released at once and can never be the start of a match.
            if self.num_output_tokens < self.params.min_tokens or not self.params.stop:
                emitted.append(self._pending + piece)
                self._pending = ""
                continue
            self._pending += piece
            stop = self._match_stop()
            if stop is not None:
                emitted.append(self._pending)
                self._pending = ""
                return self._stripped("".join(emitted), final=True), stop
            held = self._held_suffix_len()
            emitted.append(self._pending[: len(self._pending) - held])
            self._pending = self._pending[len(self._pending) - held :]
        return self._stripped("".join(emitted), final=False), None

    def flush(self) -> str:
        """The text still held back (stop-string candidates, an incomplete character at the
        end). Call once when the request finished for another reason than a stop string."""
        if self.finished:
            return ""
        tail = ""
        if self.read_offset < len(self.token_ids):
            prefix_text = self._decode(self.prefix_offset, self.read_offset)
            tail = self._decode(self.prefix_offset, len(self.token_ids))[len(prefix_text) :]
            self.prefix_offset = self.read_offset = len(self.token_ids)
        text, self._pending = self._pending + tail, ""
        return self._stripped(text, final=True)

    def _stripped(self, text: str, final: bool) -> str:
        """`text` as the stream of `answer.strip()` continues (identity unless stripping)."""
        if not self._strip:
            return text
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held_ws + text
        body = text.rstrip()
        self._held_ws = "" if final else text[len(body) :]
        return body

    def _decode(self, start: int, end: int) -> str:
        return self._decode_ids(self.token_ids[start:end])

    def _decode_next(self) -> str:
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        new_text = self._decode(self.prefix_offset, len(self.token_ids))
        # A skipped special token or an incomplete character adds no (final) text yet.
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return new_text[len(prefix_text) :]

    def _match_stop(self) -> str | None:
        """Earliest stop string in `_pending` (longest on a tie); truncates `_pending` there."""
        best: tuple[int, int, str] | None = None
        for stop in self.params.stop:
            idx = self._pending.find(stop)
            if idx >= 0 and (best is None or (idx, -len(stop)) < (best[0], -best[1])):
                best = (idx, len(stop), stop)
        if best is None:
            return None
        idx, length, stop = best
        end = idx + length if self.params.include_stop_str_in_output else idx
        self._pending = self._pending[:end]
        self.stop_reason = stop
        return stop

    def _held_suffix_len(self) -> int:
        """Length of the longest suffix of `_pending` that some stop string starts with."""
        for k in range(min(len(self._pending), self._max_stop_len - 1), 0, -1):
            suffix = self._pending[-k:]
            if any(stop.startswith(suffix) for stop in self.params.stop):
                return k
        return 0


def text_token_ids(out) -> list[int]:
    """The tokens of an EngineCoreOutput that become text: a token that stopped the request
    (eos, or one of `stop_token_ids`) is not part of the answer, as in vLLM."""
    ids = out.new_token_ids
    if ids and out.finish_reason == "stop" and not isinstance(out.stop_reason, str):
        return ids[:-1]
    return ids
