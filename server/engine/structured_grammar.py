"""`StructuredSpec` → xgrammar `Grammar` (tokenizer-independent), the one conversion both the
API (to validate: a 400 before the engine sees it) and the runner (to compile against the
tokenizer) use, so what validates is what runs.

JSON schemas: compact separators, no free whitespace (the output stays bounded). One repair
of xgrammar 0.2's converter: a length-bounded string (`maxLength`/`minLength`) gets the
character class `[^"\\\r\n]`, which admits raw control characters (U+0000-U+001F), invalid
in JSON; they are excluded, as the converter's unbounded strings already do.
"""

from __future__ import annotations

import xgrammar as xgr

from vlmserve.engine.structured_spec import StructuredSpec

JSON_SEPARATORS = (",", ":")
_BOUNDED_STRING_CHAR = '[^\\"\\\\\\r\\n]'  # as printed: [^\"\\\r\n]
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\]'  # [^\0-\x1f\"\\]


def spec_grammar(spec: StructuredSpec) -> xgr.Grammar:
    """Raises (RuntimeError / ValueError from xgrammar) when the spec does not parse."""
    if spec.kind == "json":
        grammar = xgr.Grammar.from_json_schema(spec.source, any_whitespace=False, separators=JSON_SEPARATORS,
                                               strict_mode=True)
        text = str(grammar)
        if _BOUNDED_STRING_CHAR in text:
            grammar = xgr.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))
        return grammar
    if spec.kind == "regex":
        return xgr.Grammar.from_regex(spec.source)
    return xgr.Grammar.from_ebnf(spec.source)
