"""Options every tiny-checkpoint maker takes (`vlmserve make-tiny-model`).

- `vocab_size`: rows of the embedding and LM head. Benchmarks at real sizes (Qwen2-VL
  151,936, Pixtral 131,072, Llama 3.2 Vision 128,256) need them: at 2,000 rows the LM head
  and the sampler, which dominate a real decode step, cost nothing. The tokenizer is kept
  (its ids and special tokens unchanged); the rows past it are padding that greedy decoding
  never picks, as in the published checkpoints, whose rows outnumber their tokenizers too.
- `generation_config`: "published" writes the family's published sampling defaults into
  generation_config.json; "greedy" writes the token ids only (greedy unless a request asks).
"""

from __future__ import annotations

GENERATION_CONFIGS = ("published", "greedy")


def check_tiny_options(generation_config: str) -> None:
    if generation_config not in GENERATION_CONFIGS:
        raise ValueError(f"generation_config must be one of {', '.join(GENERATION_CONFIGS)}, got {generation_config!r}")


def padded_vocab_size(num_tokens: int, vocab_size: int | None, multiple: int = 1) -> int:
    """`vocab_size` if given (at least the tokenizer's `num_tokens`), else `num_tokens`
    rounded up to `multiple`."""
    if vocab_size is None:
        return (num_tokens + multiple - 1) // multiple * multiple
    if vocab_size < num_tokens:
        raise ValueError(
            f"--vocab-size {vocab_size} is smaller than the tiny tokenizer ({num_tokens} tokens): "
            f"pass at least {num_tokens}"
        )
    return vocab_size
