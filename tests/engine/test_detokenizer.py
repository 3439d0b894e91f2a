from __future__ import annotations

from typing import Any

import pytest

from vlmserve.engine.detokenizer import IncrementalDetokenizer
from vlmserve.engine.sampling_params import SamplingParams
from tests.engine.tiny_tokenizer import make_tiny_tokenizer

TEXT = "Hello w\u00f6rld! \u4f60\u597d \U0001f642 The end. Caf\u00e9 cr\u00e8me."


def _tiny_qwen2_vl_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from vlmserve.models.qwen2_vl.tiny import build_tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), eos_token="<|im_end|>")


@pytest.fixture(scope="module", params=["byte_bpe", "tiny_qwen2_vl"])
def tok(request):
    """Two byte-level BPE tokenizers: a minimal one, and the tiny Qwen2-VL checkpoint's
    (Qwen2's pre-tokenizer split and special tokens)."""
    return make_tiny_tokenizer() if request.param == "byte_bpe" else _tiny_qwen2_vl_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _run(tok, output_ids: list[int], params: SamplingParams, prompt: str = "user: hi", step: int = 1):
    detok = IncrementalDetokenizer(tok, _ids(tok, prompt), params)
    deltas: list[str] = []
    stop = None
    for i in range(0, len(output_ids), step):
        delta, stop = detok.update(output_ids[i : i + step])
        deltas.append(delta)
        if stop is not None:
            break
    if stop is None:
        deltas.append(detok.flush())
    return deltas, stop, detok


def test_fixture_splits_multibyte_characters_over_tokens(tok):
    # The tests below only mean something if single tokens decode to partial UTF-8.
    assert any("\ufffd" in tok.decode([i]) for i in _ids(tok, TEXT))


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_deltas_concatenate_to_full_decode_without_replacement_chars(tok, step):
    ids = _ids(tok, TEXT)
    deltas, stop, _ = _run(tok, ids, SamplingParams(), step=step)
    assert stop is None
    assert "".join(deltas) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_skip_special_tokens_controls_special_token_text(tok):
    ids = _ids(tok, "Hello") + [tok.convert_tokens_to_ids("<|im_end|>")] + _ids(tok, " world")
    skipped, _, _ = _run(tok, ids, SamplingParams(skip_special_tokens=True))
    kept, _, _ = _run(tok, ids, SamplingParams(skip_special_tokens=False))
    assert "".join(skipped) == "Hello world"
    assert "".join(kept) == "Hello<|im_end|> world"


def test_stop_string_spanning_tokens_truncates_output(tok):
    ids = _ids(tok, TEXT)
    deltas, stop, detok = _run(tok, ids, SamplingParams(stop=("The end",)))
    assert stop == "The end"
    assert "".join(deltas) == "Hello w\u00f6rld! \u4f60\u597d \U0001f642 "
    assert detok.finished and detok.stop_reason == "The end"


def test_include_stop_str_in_output_keeps_the_stop_string(tok):
    ids = _ids(tok, TEXT)
    deltas, stop, _ = _run(tok, ids, SamplingParams(stop=("The end",), include_stop_str_in_output=True))
    assert stop == "The end"
    assert "".join(deltas) == "Hello w\u00f6rld! \u4f60\u597d \U0001f642 The end"


def test_stop_string_made_of_multibyte_characters(tok):
    ids = _ids(tok, TEXT)
    deltas, stop, _ = _run(tok, ids, SamplingParams(stop=("\u597d \U0001f642",)))
    assert stop == "\u597d \U0001f642"
    assert "".join(deltas) == "Hello w\u00f6rld! \u4f60"


def test_emitted_text_is_never_retracted_by_a_later_stop(tok):
    # Every prefix emitted so far must be a prefix of the final (truncated) output: text
    # that turns out to start a stop string is held back, not sent and then cut.
    ids = _ids(tok, TEXT)
    params = SamplingParams(stop=("world", "end.", "Caf\u00e9 cr"))
    deltas, stop, _ = _run(tok, ids, params)
    final = "".join(deltas)
    assert stop == "end."
    assert final == "Hello w\u00f6rld! \u4f60\u597d \U0001f642 The "
    for i in range(len(deltas)):
        assert final.startswith("".join(deltas[:i]))


def test_partial_stop_match_is_held_until_resolved(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=("Hello there",)))
    delta, stop = detok.update(_ids(tok, "Say Hello"))
    assert (delta, stop) == ("Say ", None)  # "Hello" may be the start of the stop string
    delta, stop = detok.update(_ids(tok, " world"))
    assert (delta, stop) == ("Hello world", None)


def test_flush_releases_held_text_when_no_stop_matched(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=("Hello!!",)))
    delta, stop = detok.update(_ids(tok, "Say Hello!"))
    assert (delta, stop) == ("Say ", None)
    assert detok.flush() == "Hello!"
    assert detok.flush() == ""


def test_flush_releases_an_unfinished_character(tok):
    emoji = _ids(tok, "\U0001f642")
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    assert detok.update(_ids(tok, "ok ") + emoji[:-1]) == ("ok ", None)
    assert detok.flush() == "\ufffd"  # the model stopped inside a character: shown, not lost


def test_tokens_after_a_stop_add_nothing(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=("!",)))
    delta, stop = detok.update(_ids(tok, "Hi! more text"))
    assert (delta, stop) == ("Hi", "!")
    assert detok.update(_ids(tok, " later")) == ("", None)
    assert detok.flush() == ""


def test_stop_strings_in_the_prompt_are_not_matched(tok):
    deltas, stop, _ = _run(tok, _ids(tok, " fine"), SamplingParams(stop=("The end",)), prompt="The end")
    assert stop is None and "".join(deltas) == " fine"


def test_stop_strings_ignored_before_min_tokens(tok):
    ids = _ids(tok, "Hi! Hi! Hi!")
    first_bang = next(i for i, t in enumerate(ids) if tok.decode(ids[: i + 1]).endswith("!"))
    params = SamplingParams(stop=("!",), min_tokens=first_bang + 2)
    deltas, stop, detok = _run(tok, ids, params)
    assert stop == "!"
    assert "".join(deltas) == "Hi! Hi"
    assert detok.num_output_tokens > first_bang + 1


def test_earliest_stop_in_the_text_wins_over_list_order(tok):
    deltas, stop, _ = _run(tok, _ids(tok, "the quick brown fox"), SamplingParams(stop=("fox", "quick")), step=5)
    assert stop == "quick" and "".join(deltas) == "the "


class _CountingTokenizer:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.max_window = 0
        self.calls = 0

    def decode(self, ids, **kw):
        self.calls += 1
        self.max_window = max(self.max_window, len(ids))
        return self.inner.decode(ids, **kw)


def test_cost_per_token_does_not_grow_with_output_length(tok):
    counting = _CountingTokenizer(tok)
    ids = _ids(tok, TEXT) * 40  # ~900 tokens
    detok = IncrementalDetokenizer(counting, _ids(tok, "a long prompt " * 50), SamplingParams(stop=("zzz",)))
    out = "".join(detok.update([i])[0] for i in ids) + detok.flush()
    assert out == TEXT * 40
    assert counting.calls <= 2 * len(ids) + 2
    assert counting.max_window <= 8  # the window spans one character's bytes plus context


@pytest.mark.parametrize("skip", [True, False])
def test_fast_path_decodes_exactly_as_the_tokenizer_does(tok, skip):
    """Fast tokenizers are decoded by their Rust tokenizer directly; random id streams (special
    tokens, split characters included) give the same deltas as through `tokenizer.decode`."""
    import random

    from vlmserve.engine import detokenizer

    fast = detokenizer._ids_decoder(tok, skip)
    assert fast.__code__ is not detokenizer._ids_decoder(_CountingTokenizer(tok), skip).__code__  # it is taken
    rng = random.Random(7)
    params = SamplingParams(skip_special_tokens=skip)
    for _ in range(20):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))]
        assert fast(ids) == tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
        got = IncrementalDetokenizer(tok, [1, 2], params)
        ref = IncrementalDetokenizer(_CountingTokenizer(tok), [1, 2], params)
        assert [got.update([i])[0] for i in ids] + [got.flush()] == [ref.update([i])[0] for i in ids] + [ref.flush()]


@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("text", ["  Hello  world \n\n", "\n\nA\tb  ", "   ", "x", " \u3000caf\u00e9 \u2003"])
def test_strip_whitespace_streams_exactly_the_stripped_answer(tok, text, step):
    # Families whose official chat() returns response.strip() (NVLM-D): every delta, joined,
    # is the stripped full decode; trailing whitespace is never emitted before text follows it.
    ids = _ids(tok, text)
    detok = IncrementalDetokenizer(tok, _ids(tok, "user: hi"), SamplingParams(max_tokens=64), strip_whitespace=True)
    deltas = [detok.update(ids[i : i + step])[0] for i in range(0, len(ids), step)]
    assert all(d == "" or (not d[-1].isspace()) for d in deltas)
    assert "".join(deltas) + detok.flush() == tok.decode(ids).strip()


def test_strip_whitespace_applies_after_a_stop_string(tok):
    ids = _ids(tok, " yes  STOP more")
    params = SamplingParams(max_tokens=64, stop=["STOP"])
    detok = IncrementalDetokenizer(tok, _ids(tok, "user: hi"), params, strip_whitespace=True)
    out, stop = "", None
    for t in ids:
        delta, stop = detok.update([t])
        out += delta
        if stop is not None:
            break
    assert stop == "STOP" and out == "yes"
