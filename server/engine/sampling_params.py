"""Per-request sampling parameters (plain Python; no torch).

Built by the API layer from a request plus the checkpoint's generation_config defaults,
validated once, then read-only for the request's life.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vlmserve.engine.structured_spec import StructuredSpec

# Below this temperature a request is sampled greedily.
GREEDY_EPS = 1e-5
# The sampler holds these in int64 tensors; any top_k past the vocabulary keeps every token.
MAX_TOP_K = 2**31 - 1
SEED_RANGE = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per token; None: no logprobs
    n: int = 1
    skip_special_tokens: bool = True
    # Grammar-constrained output (JSON schema, regex, EBNF); None: free text.
    structured: StructuredSpec | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # The engine is shared: a value its tensors cannot hold would fail a whole step, so
        # every bound is checked here, whoever built the params (the API checks them too).
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not -1 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be -1, 0 (disabled) or in [1, {MAX_TOP_K}], got {self.top_k}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")
        if any(not 0 <= t < 2**63 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative 64-bit token ids")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS
