"""What a constrained request's output must match (plain Python; no torch, no grammar library).

Built by the API layer (`vlmserve.api.structured`) from `response_format`, vLLM's
`structured_outputs` / `guided_*` fields, or a tool choice; carried inside `SamplingParams`
to the engine-core process, where `vlmserve.runner.structured` compiles it against the
tokenizer. Frozen and hashable: the compiled-grammar cache is keyed by it, so n choices and
repeated schemas compile once.

`kind` / `source`:
- "json": `source` is a JSON Schema (compact JSON text, in the client's key order, which
  is the order of the output's properties).
  Compiled with compact separators and no free whitespace, so a confused model cannot pad
  with whitespace until max_tokens.
- "regex": `source` is a regular expression the whole output must match.
- "grammar": `source` is an EBNF (GBNF-style) grammar whose start rule is `root`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

StructuredKind = Literal["json", "regex", "grammar"]


@dataclass(frozen=True)
class StructuredSpec:
    kind: StructuredKind
    source: str

    def __post_init__(self) -> None:
        if self.kind not in ("json", "regex", "grammar"):
            raise ValueError(f"structured output kind must be json, regex or grammar, got {self.kind!r}")
        if not isinstance(self.source, str) or not self.source:
            raise ValueError("structured output source must be a non-empty string")
