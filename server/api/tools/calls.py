"""`tools` + `tool_choice` of a chat request → a `ToolPlan`, and generated text → tool calls.

Modes:
- "none": tools are shown to the template (as OpenAI does) but the output is plain content.
- "auto": the family's own tool-call format (`formats.py`); the text is parsed afterwards.
- "named": the grammar forces the named function's arguments: the output *is* the arguments
  JSON, valid against its `parameters` schema, on every family.
- "required": the grammar forces a JSON array of `{"name": ..., "parameters": {...}}`, one
  item per call (exactly one when `parallel_tool_calls` is false), each item valid against
  its function's schema, on every family.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from vlmserve.api.errors import APIError
from vlmserve.api.structured import schema_spec
from vlmserve.engine.structured_spec import StructuredSpec

ToolMode = Literal["none", "auto", "named", "required"]
MAX_TOOLS = 128
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}
_ID_ALPHABET = string.ascii_letters + string.digits


def tool_call_id() -> str:
    """`call_` + 24 alphanumerics; the 9-character tail form is what Mistral tokenizers take."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=tool_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolPlan:
    mode: ToolMode
    functions: list[dict[str, Any]]  # OpenAI function objects: name, description?, parameters
    named: str | None = None
    parallel: bool = True
    spec: StructuredSpec | None = None  # the grammar of "named" and "required"

    @property
    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as chat templates take them (OpenAI's own shape)."""
        return [{"type": "function", "function": f} for f in self.functions]


def _functions(tools: list[Any]) -> list[dict[str, Any]]:
    if len(tools) > MAX_TOOLS:
        raise APIError(f"tools has {len(tools)} entries; at most {MAX_TOOLS} are allowed", param="tools")
    out: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise APIError(f"{where}: only tools of type 'function' are supported", param=f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(f"{where}.function.name must be a non-empty string", param=f"{where}.function.name")
        if fn["name"] in names:
            raise APIError(f"{where}: the function name {fn['name']!r} is given twice", param=f"{where}.function.name")
        names.add(fn["name"])
        params = fn.get("parameters", _EMPTY_PARAMETERS)
        if not isinstance(params, dict):
            raise APIError(f"{where}.function.parameters must be a JSON Schema object",
                           param=f"{where}.function.parameters")
        entry = {"name": fn["name"], "parameters": params}
        if isinstance(fn.get("description"), str):
            entry["description"] = fn["description"]
        out.append(entry)
    return out


def _required_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    items = [
        {"type": "object", "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                          "parameters": f["parameters"]},
         "required": ["name", "parameters"], "additionalProperties": False}
        for f in functions
    ]
    schema: dict[str, Any] = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items},
                              "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan | None:
    """None when the request has no tools (and a tool_choice that needs none)."""
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    if not tools:
        if tool_choice not in (None, "none"):
            raise APIError("tool_choice needs tools; send tools or remove tool_choice", param="tool_choice")
        return None
    functions = _functions(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none", functions, parallel=parallel)
    if choice == "auto":
        return ToolPlan("auto", functions, parallel=parallel)
    if choice == "required":
        spec = schema_spec(_required_schema(functions, parallel), "tools")
        return ToolPlan("required", functions, parallel=parallel, spec=spec)
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        fn = next((f for f in functions if f["name"] == name), None)
        if fn is None:
            raise APIError(f"tool_choice names the function {name!r}, which is not in tools "
                           f"({', '.join(f['name'] for f in functions)})", param="tool_choice")
        return ToolPlan("named", functions, named=name, parallel=parallel,
                        spec=schema_spec(fn["parameters"], f"tools[{functions.index(fn)}].function.parameters"))
    raise APIError("tool_choice must be 'none', 'auto', 'required' or "
                   "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
