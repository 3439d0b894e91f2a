"""Each family's own tool-call format (tool_choice "auto", and tool history in the prompt).

A format does two things:
- `prepare(conversation, plan)`: the HF conversation (with OpenAI-style assistant
  `tool_calls` and `tool` messages, as `to_hf_conversation` builds it) and the tools → what the
  family's chat template takes, plus extra template kwargs. A template that knows tools gets
  them as `tools=`; one that does not gets them written into the messages in the format the
  model was trained on.
- `parse(text)` / `call_start(text)`: a generated answer → (content, calls), and where in a
  streamed answer a call starts (content before it streams; the rest is held back).

Table-driven: `FAMILY_FORMATS` maps a family to its format; a family not in it gets
`GrammarOnly` (no tool format in its template: "required" and named calls work through the
grammar, "auto" is refused with a 400 that says so). `--tool-call-format` overrides.
"""

from __future__ import annotations

import json
import re
from typing import Any

from vlmserve.api.tools.calls import ToolCall, ToolPlan


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return "" if content is None else _compact(content)


def _held_prefix(text: str, marker: str) -> int | None:
    """Index of the marker in `text`, or of a suffix of `text` that could begin it."""
    at = text.find(marker)
    if at >= 0:
        return at
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return len(text) - k
    return None


def _prepend_text(message: dict[str, Any], text: str) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        return dict(message, content=[{"type": "text", "text": text}, *content])
    return dict(message, content=text + (content or ""))


def _parts(content: Any) -> list[dict[str, Any]]:
    return list(content) if isinstance(content, list) else [{"type": "text", "text": content or ""}]


def _joined(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two user turns as one (image parts kept, in order)."""
    if isinstance(first.get("content"), list) or isinstance(second.get("content"), list):
        return dict(first, content=[*_parts(first.get("content")), {"type": "text", "text": "\n"},
                                    *_parts(second.get("content"))])
    return dict(first, content=(first.get("content") or "") + "\n" + (second.get("content") or ""))


def _merge_user(conversation: list[dict[str, Any]], text: str) -> None:
    """Appends `text` as a user turn, merged into a preceding user turn (templates that need
    alternating roles)."""
    if conversation and conversation[-1]["role"] == "user":
        last = conversation[-1]
        content = last.get("content")
        if isinstance(content, list):
            conversation[-1] = dict(last, content=[*content, {"type": "text", "text": "\n" + text}])
        else:
            conversation[-1] = dict(last, content=(content or "") + "\n" + text)
    else:
        conversation.append({"role": "user", "content": text})


def _calls_from_objects(objects: Any, args_key: tuple[str, ...]) -> list[ToolCall] | None:
    items = objects if isinstance(objects, list) else [objects]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        args = next((item[k] for k in args_key if k in item), {})
        calls.append(ToolCall(item["name"], _compact(args)))
    return calls


class ToolFormat:
    """The default: no tool format. Tools and tool history are written as plain text into
    user and assistant turns (some templates have no system role, some need alternation)."""

    name = "grammar_only"
    supports_auto = False
    skip_special_tokens: bool | None = None  # auto mode: None keeps the request's choice

    def prepare(self, conversation: list[dict[str, Any]], plan: ToolPlan | None) -> tuple[list[dict[str, Any]], dict]:
        out: list[dict[str, Any]] = []
        for msg in conversation:
            if msg.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                         for c in msg["tool_calls"]]
                text = (_text_of(msg.get("content")) + "\n" if msg.get("content") else "") + json.dumps(calls)
                out.append({"role": "assistant", "content": text})
            elif msg["role"] == "tool":
                _merge_user(out, f"Result of tool call {msg.get('tool_call_id') or ''}: {_text_of(msg.get('content'))}")
            elif msg["role"] == "user" and out and out[-1]["role"] == "user":
                out[-1] = _joined(out[-1], msg)
            else:
                out.append(msg)
        first_user = next((i for i, m in enumerate(out) if m["role"] == "user"), None)
        if plan is not None and plan.functions and first_user is not None:
            text = "Available functions (JSON Schema): " + json.dumps(plan.functions, ensure_ascii=False) + "\n"
            out[first_user] = _prepend_text(out[first_user], text)
        return out, {}

    def call_start(self, text: str) -> int | None:
        return None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return text, []


class Hermes(ToolFormat):
    """Qwen's format (Qwen2.5's template text; Qwen2-VL's own template has no tools):
    `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, tools listed in
    the system message, results in user turns as `<tool_response>` blocks."""

    name = "hermes"
    supports_auto = True
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
    _SYSTEM = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
    _SYSTEM_END = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                   "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                   "\"arguments\": <args-json-object>}\n</tool_call>")

    def prepare(self, conversation, plan):
        out: list[dict[str, Any]] = []
        for msg in conversation:
            if msg.get("tool_calls"):
                text = _text_of(msg.get("content"))
                for c in msg["tool_calls"]:
                    body = json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                      ensure_ascii=False)
                    text += ("\n" if text else "") + f"<tool_call>\n{body}\n</tool_call>"
                out.append({"role": "assistant", "content": text})
            elif msg["role"] == "tool":
                block = f"<tool_response>\n{_text_of(msg.get('content'))}\n</tool_response>"
                if out and out[-1].get("_tool_turn"):
                    out[-1] = dict(out[-1], content=out[-1]["content"] + "\n" + block)
                else:
                    out.append({"role": "user", "content": block, "_tool_turn": True})
            else:
                out.append(msg)
        out = [{k: v for k, v in m.items() if k != "_tool_turn"} for m in out]
        if plan is not None and plan.functions:
            tools = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in plan.template_tools)
            text = self._SYSTEM + tools + self._SYSTEM_END
            if out and out[0]["role"] == "system":
                out[0] = dict(out[0], content=_text_of(out[0]["content"]) + text)
            else:
                out.insert(0, {"role": "system", "content": "You are a helpful assistant." + text})
        return out, {}

    def call_start(self, text):
        return _held_prefix(text, "<tool_call>")

    def parse(self, text):
        at = text.find("<tool_call>")
        if at < 0:
            return text, []
        calls: list[ToolCall] = []
        for body in self._BLOCK.findall(text[at:]):
            try:
                parsed = _calls_from_objects(json.loads(body), ("arguments", "parameters"))
            except json.JSONDecodeError:
                parsed = None
            if parsed is None:
                return text, []
            calls.extend(parsed)
        return (text[:at].strip() or None), calls


class MistralTools(ToolFormat):
    """Mistral / Pixtral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`. The Mistral
    format goes through mistral-common (`tools` reach `encode_chat`); an HF-format checkpoint's
    template has no tools, so [AVAILABLE_TOOLS] / [TOOL_CALLS] / [TOOL_RESULTS] are written
    into the messages. [TOOL_CALLS] is a special token: auto mode keeps special tokens."""

    name = "mistral"
    supports_auto = True
    skip_special_tokens = False
    MARKER = "[TOOL_CALLS]"

    def __init__(self, mistral_format: bool = False) -> None:
        self.mistral_format = mistral_format

    def prepare(self, conversation, plan):
        if self.mistral_format:
            return conversation, ({"tools": plan.template_tools} if plan is not None and plan.functions else {})
        out: list[dict[str, Any]] = []
        for msg in conversation:
            if msg.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                         for c in msg["tool_calls"]]
                out.append({"role": "assistant", "content": self.MARKER + json.dumps(calls, ensure_ascii=False)})
            elif msg["role"] == "tool":
                result = {"content": _text_of(msg.get("content")), "call_id": msg.get("tool_call_id") or ""}
                _merge_user(out, "[TOOL_RESULTS]" + json.dumps(result, ensure_ascii=False) + "[/TOOL_RESULTS]")
            elif msg["role"] == "user" and out and out[-1]["role"] == "user":
                # The template wants user/assistant turns alternating: a question after
                # tool results joins their turn.
                out[-1] = _joined(out[-1], msg)
            else:
                out.append(msg)
        if plan is not None and plan.functions:
            last_user = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
            text = "[AVAILABLE_TOOLS]" + json.dumps(plan.template_tools, ensure_ascii=False) + "[/AVAILABLE_TOOLS]"
            if last_user is not None:
                out[last_user] = _prepend_text(out[last_user], text)
        return out, {}

    def call_start(self, text):
        return _held_prefix(text, self.MARKER)

    def parse(self, text):
        at = text.find(self.MARKER)
        if at < 0:
            return text, []
        body = text[at + len(self.MARKER):].strip()
        try:
            calls = _calls_from_objects(json.loads(body), ("arguments", "parameters"))
        except json.JSONDecodeError:
            calls = None
        return (text, []) if not calls else ((text[:at].strip() or None), calls)


class Llama3Json(ToolFormat):
    """Llama 3.x JSON tool calls: the template takes `tools=` (and renders assistant
    `tool_calls` and `tool` messages itself); the model answers
    `{"name": ..., "parameters": {...}}` (optionally after <|python_tag|>, several joined by ';')."""

    name = "llama3_json"
    supports_auto = True
    _TAG = "<|python_tag|>"

    def prepare(self, conversation, plan):
        out = []
        for msg in conversation:
            if msg.get("tool_calls"):
                calls = [{"type": "function", "function": {"name": c["function"]["name"],
                          "arguments": c["function"]["arguments"]}} for c in msg["tool_calls"]]
                msg = {"role": "assistant", "content": _text_of(msg.get("content")), "tool_calls": calls}
            elif msg["role"] == "tool":
                msg = {"role": "tool", "content": _text_of(msg.get("content"))}
            out.append(msg)
        if plan is None or not plan.functions:
            return out, {}
        kwargs: dict[str, Any] = {"tools": plan.template_tools}
        first = next((m for m in out if m["role"] != "system"), None)
        if first is not None and isinstance(first.get("content"), list):
            # The template puts tools into the first user message as text (`content|trim`), which
            # would flatten its image parts: they go into the system message instead, which the
            # template writes only when one is given.
            kwargs["tools_in_user_message"] = False
            if out[0]["role"] != "system":
                out.insert(0, {"role": "system", "content": ""})
        return out, kwargs

    def call_start(self, text):
        stripped = text.lstrip()
        if not stripped:
            return 0  # nothing but whitespace yet: it may still become a call
        if stripped.startswith(("{", self._TAG)) or self._TAG.startswith(stripped):
            return 0
        return None

    def parse(self, text):
        body = text.strip()
        if body.startswith(self._TAG):
            body = body[len(self._TAG):].strip()
        if not body.startswith("{"):
            return text, []
        try:
            calls = _calls_from_objects(json.loads(body), ("parameters", "arguments"))
        except json.JSONDecodeError:
            try:
                calls = _calls_from_objects([json.loads(p) for p in body.split(";") if p.strip()],
                                            ("parameters", "arguments"))
            except json.JSONDecodeError:
                calls = None
        return (text, []) if not calls else (None, calls)


FORMATS: dict[str, type[ToolFormat]] = {f.name: f for f in (ToolFormat, Hermes, MistralTools, Llama3Json)}
# family name (registry) -> its format; families not listed: grammar only.
FAMILY_FORMATS: dict[str, str] = {"qwen2_vl": "hermes", "pixtral": "mistral", "mllama": "llama3_json"}


def tool_format(family: str | None, *, mistral_format: bool = False, override: str | None = None) -> ToolFormat:
    name = override or FAMILY_FORMATS.get(family or "", "grammar_only")
    if name not in FORMATS:
        raise ValueError(f"unknown tool-call format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return MistralTools(mistral_format) if name == "mistral" else FORMATS[name]()
