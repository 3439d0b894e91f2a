"""Structured-output fields of a request → one `StructuredSpec`, validated (pure but for the
grammar library's parser; no engine, no tokenizer).

Accepted, at most one per request:
- OpenAI `response_format`: `{"type": "text"}` (nothing), `{"type": "json_object"}` (any JSON
  object), `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
- vLLM's `structured_outputs`: exactly one of `json` (schema, object or JSON text), `regex`,
  `choice` (list of strings), `grammar` (EBNF), `json_object: true`;
- vLLM's older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`.

Validation parses the grammar here (xgrammar's tokenizer-independent front end), so that a
schema the engine could not compile is a 400 naming the field and the problem, and never
reaches the engine core; results are cached by spec.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from vlmserve.api.errors import APIError
from vlmserve.engine.structured_grammar import spec_grammar
from vlmserve.engine.structured_spec import StructuredSpec

JSON_OBJECT_SCHEMA = '{"type":"object"}'
MAX_CHOICES = 1024
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_SO_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# xgrammar's messages start with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed check.
_LOG_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")
_CHECK_FAILED = re.compile(r"^Check failed: \(.*?\) is false:\s*")


def schema_spec(schema: Any, param: str) -> StructuredSpec:
    """A JSON Schema (dict, bool or JSON text) → the "json" spec. Key order is kept: the
    output's properties come in the schema's order."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise APIError(f"{param} is not valid JSON: {e}", param=param, code="invalid_schema") from None
    if not isinstance(schema, (dict, bool)):
        raise APIError(f"{param} must be a JSON Schema object, got {type(schema).__name__}", param=param,
                       code="invalid_schema")
    return StructuredSpec("json", json.dumps(schema, separators=(",", ":")))


def choice_spec(choices: Any, param: str) -> StructuredSpec:
    """The output is exactly one of `choices`: an EBNF alternation of string literals."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise APIError(f"{param} must be a non-empty list of non-empty strings", param=param)
    if len(choices) > MAX_CHOICES:
        raise APIError(f"{param} has {len(choices)} choices; at most {MAX_CHOICES} are allowed", param=param)
    # EBNF string literals take JSON's escapes.
    return StructuredSpec("grammar", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


def _text_spec(kind: str, value: Any, param: str) -> StructuredSpec:
    if not isinstance(value, str) or not value:
        raise APIError(f"{param} must be a non-empty string", param=param)
    return StructuredSpec(kind, value)  # type: ignore[arg-type]


def _response_format_spec(fmt: dict[str, Any]) -> StructuredSpec | None:
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec("json", JSON_OBJECT_SCHEMA)
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        if not isinstance(inner, dict):
            raise APIError("response_format.json_schema must be an object with name and schema",
                           param="response_format.json_schema")
        schema = inner.get("schema", {"type": "object"})
        return schema_spec(schema, "response_format.json_schema.schema")
    raise APIError(f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
                   param="response_format.type")


def _structured_outputs_spec(so: Any) -> StructuredSpec:
    if not isinstance(so, dict):
        raise APIError("structured_outputs must be an object with one of " + ", ".join(_SO_KINDS),
                       param="structured_outputs")
    given = [k for k in _SO_KINDS if so.get(k) not in (None, False)]
    if len(given) != 1:
        raise APIError(f"structured_outputs must set exactly one of {', '.join(_SO_KINDS)}; got "
                       f"{', '.join(given) or 'none'}", param="structured_outputs")
    kind = given[0]
    param = f"structured_outputs.{kind}"
    if kind == "json":
        return schema_spec(so["json"], param)
    if kind == "json_object":
        return StructuredSpec("json", JSON_OBJECT_SCHEMA)
    if kind == "choice":
        return choice_spec(so["choice"], param)
    return _text_spec(kind, so[kind], param)


def request_spec(response_format: dict[str, Any] | None, extra: dict[str, Any]) -> tuple[StructuredSpec | None, str]:
    """(the request's spec or None, the field it came from). More than one source is a 400."""
    found: list[tuple[StructuredSpec, str]] = []
    if response_format is not None:
        spec = _response_format_spec(response_format)
        if spec is not None:
            found.append((spec, "response_format"))
    if extra.get("structured_outputs") is not None:
        found.append((_structured_outputs_spec(extra["structured_outputs"]), "structured_outputs"))
    for name in _GUIDED:
        value = extra.get(name)
        if value is None:
            continue
        if name == "guided_json":
            found.append((schema_spec(value, name), name))
        elif name == "guided_choice":
            found.append((choice_spec(value, name), name))
        else:
            found.append((_text_spec("regex" if name == "guided_regex" else "grammar", value, name), name))
    if len(found) > 1:
        raise APIError(f"{found[0][1]} and {found[1][1]} both constrain the output; send only one",
                       param=found[1][1])
    return found[0] if found else (None, "")


def clean_error(message: str) -> str:
    lines = [line for line in (_LOG_PREFIX.sub("", s).strip() for s in message.splitlines()) if line]
    text = _CHECK_FAILED.sub("", lines[0] if lines else message)
    return text[:500]


@functools.lru_cache(maxsize=1024)
def _parse(spec: StructuredSpec) -> str | None:
    """None when the grammar parses; else the library's reason."""
    try:
        spec_grammar(spec)
    except Exception as e:  # the library raises RuntimeError / ValueError subclasses
        return clean_error(str(e))
    return None


def validate_spec(spec: StructuredSpec, param: str) -> None:
    """400 naming `param` when the engine could not compile `spec`. Call it off the event
    loop (`asyncio.to_thread`): a large schema takes milliseconds to convert."""
    error = _parse(spec)
    if error is not None:
        what = {"json": "JSON schema", "regex": "regular expression", "grammar": "grammar"}[spec.kind]
        raise APIError(f"{param}: the {what} cannot be compiled: {error}", param=param, code="invalid_schema")
