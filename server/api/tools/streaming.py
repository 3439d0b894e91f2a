"""Generated text → OpenAI tool-call deltas, one `ToolStreamer` per streamed choice.

OpenAI's shape: `delta.tool_calls = [{"index", "id", "type", "function": {"name",
"arguments": ""}}]` once per call, then `[{"index", "function": {"arguments": fragment}}]`
until the call's arguments are complete; the fragments concatenate to the arguments JSON.

- "named": the whole output is the arguments: announced before the first token, then each
  text delta is a fragment.
- "required": the output is the grammar's compact `[{"name":"f","parameters":{...}},...]`;
  `scan_call_array` finds each call's name and the span of its arguments in the text so far,
  so names are announced as soon as they are complete and arguments stream as generated.
- "auto": content streams until the family format's call marker appears (a possible partial
  marker at the end is held back); what follows is parsed when the choice finishes, each call
  sent as one delta with its whole arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vlmserve.api.tools.calls import ToolCall, ToolPlan, tool_call_id
from vlmserve.api.tools.formats import ToolFormat


@dataclass
class ScannedCall:
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None  # exclusive; None while the arguments are still open


def scan_call_array(text: str) -> list[ScannedCall]:
    """The calls of a (prefix of a) JSON array of `{"name": str, "parameters": value}`."""
    calls: list[ScannedCall] = []
    depth, in_str, esc = 0, False, False
    str_start = 0
    expecting_key = False
    key: str | None = None
    value_key: str | None = None
    cur: ScannedCall | None = None
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
                if depth == 2 and cur is not None:
                    literal = json.loads(text[str_start:i + 1])
                    if expecting_key:
                        key = literal
                    elif value_key == "name":
                        cur.name = literal
            continue
        if ch == '"':
            in_str, str_start = True, i
        elif ch in "{[":
            depth += 1
            if depth == 2 and ch == "{":
                cur = ScannedCall()
                calls.append(cur)
                expecting_key, value_key = True, None
        elif ch in "}]":
            if depth == 2 and cur is not None and value_key == "parameters" and cur.args_end is None:
                cur.args_end = i  # a scalar value ends at the object's close
            depth -= 1
            if depth == 2 and cur is not None and value_key == "parameters" and cur.args_end is None:
                cur.args_end = i + 1
        elif depth == 2 and cur is not None:
            if ch == ":":
                expecting_key, value_key = False, key
                if key == "parameters":
                    cur.args_start = i + 1
            elif ch == ",":
                if value_key == "parameters" and cur.args_end is None:
                    cur.args_end = i
                expecting_key = True
    return calls


def _announce(index: int, call_id: str, name: str) -> dict[str, Any]:
    return {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}


def _fragment(index: int, text: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": text}}


class ToolStreamer:
    """feed(text delta) → (content delta, tool-call deltas); finish() → the rest."""

    def __init__(self, plan: ToolPlan, fmt: ToolFormat) -> None:
        self.plan, self.fmt = plan, fmt
        self.text = ""
        self.ids: list[str] = []
        self.sent_args: list[int] = []
        self.content_sent = 0
        self.num_calls = 0

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        self.text += delta
        mode = self.plan.mode
        if mode == "named":
            out = []
            if not self.ids:
                self.ids.append(tool_call_id())
                self.num_calls = 1
                out.append(_announce(0, self.ids[0], self.plan.named or ""))
            if delta:
                out.append(_fragment(0, delta))
            return "", out
        if mode == "required":
            return "", self._required_deltas()
        if mode == "auto":
            start = self.fmt.call_start(self.text)
            limit = len(self.text) if start is None else start
            content = self.text[self.content_sent:limit] if limit > self.content_sent else ""
            self.content_sent = max(self.content_sent, limit)
            return content, []
        return delta, []

    def _required_deltas(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i, call in enumerate(scan_call_array(self.text)):
            if call.name is None:
                break
            if i >= len(self.ids):
                self.ids.append(tool_call_id())
                self.sent_args.append(0)
                self.num_calls = len(self.ids)
                out.append(_announce(i, self.ids[i], call.name))
            if call.args_start is None:
                continue
            end = call.args_end if call.args_end is not None else len(self.text)
            args = self.text[call.args_start:end]
            if len(args) > self.sent_args[i]:
                out.append(_fragment(i, args[self.sent_args[i]:]))
                self.sent_args[i] = len(args)
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """At the choice's end: in "auto" mode the calls parsed from the held-back text (or
        that text as content when it holds no valid call)."""
        if self.plan.mode != "auto":
            return "", []
        content, calls = self.fmt.parse(self.text)
        if not calls:
            rest = self.text[self.content_sent:]
            self.content_sent = len(self.text)
            return rest, []
        self.num_calls = len(calls)
        # Content before the marker was already sent; what parse() kept is at most that.
        return "", [dict(_announce(i, c.id, c.name), function={"name": c.name, "arguments": c.arguments})
                    for i, c in enumerate(calls)]


def grammar_calls(plan: ToolPlan, text: str) -> list[ToolCall] | None:
    """The calls of a grammar-forced output ("named" / "required"), arguments as the raw JSON
    text generated (what streaming sends in fragments); None if the text is not complete JSON
    (the request hit max_tokens first)."""
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return None
    if plan.mode == "named":
        return [ToolCall(plan.named or "", text.strip())]
    return [ToolCall(c.name, text[c.args_start:c.args_end]) for c in scan_call_array(text)
            if c.name is not None and c.args_end is not None]


def message_calls(plan: ToolPlan, fmt: ToolFormat, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole, non-streamed output."""
    if plan.mode in ("named", "required"):
        calls = grammar_calls(plan, text)
        return (None, calls) if calls else (text, [])
    if plan.mode == "auto":
        return fmt.parse(text)
    return text, []
