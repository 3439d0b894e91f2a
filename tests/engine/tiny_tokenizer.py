"""A small byte-level BPE tokenizer for tests that need a real tokenizer but no checkpoint.

Trained in memory on a fixed corpus with a vocabulary small enough that CJK characters and
emoji stay split over several byte tokens: decoding one token at a time then produces
partial UTF-8, which is what the incremental detokenizer must handle.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]

_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "hello there, general Kenobi. The end is near; the end is here.",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve r\u00e9sum\u00e9, stra\u00dfe.",
    "user assistant system: describe the image in one sentence.",
    "numbers 0123456789 and punctuation .,;:!?-()[]{}",
]


@lru_cache(maxsize=1)
def _build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh transformers tokenizer over the cached trained BPE (eos: <|endoftext|>)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_build().to_str()),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
