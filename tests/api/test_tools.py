"""Tool plans, family formats (render + parse), streamed tool-call deltas, and the request →
grammar-spec mapping (pure; the served behaviour is in test_structured_e2e.py)."""

from __future__ import annotations

import json

import pytest

from vlmserve.api.errors import APIError
from vlmserve.api.structured import request_spec, validate_spec
from vlmserve.api.tools.calls import plan_tools
from vlmserve.api.tools.formats import FAMILY_FORMATS, Hermes, Llama3Json, MistralTools, ToolFormat, tool_format
from vlmserve.api.tools.streaming import ToolStreamer, scan_call_array
from tests.api.helpers import MODEL

F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}}, "required": ["a"]}}}
G = {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}}


def test_plans_follow_tool_choice_and_errors_name_the_field():
    assert plan_tools(None, None, None) is None
    assert plan_tools([F], None, None).mode == "auto" and plan_tools([F], "none", None).spec is None
    named = plan_tools([F, G], {"type": "function", "function": {"name": "g"}}, None)
    assert named.mode == "named" and json.loads(named.spec.source) == G["function"]["parameters"]
    required = json.loads(plan_tools([F, G], "required", False).spec.source)
    assert required["minItems"] == 1 and required["maxItems"] == 1 and len(required["items"]["anyOf"]) == 2
    assert "maxItems" not in json.loads(plan_tools([F], "required", True).spec.source)
    for tools, choice, param in (([F], {"type": "function", "function": {"name": "h"}}, "tool_choice"),
                                 (None, "required", "tool_choice"), ([F, F], "auto", "tools[1].function.name"),
                                 ([{"type": "retrieval"}], "auto", "tools[0].type"), ([F], "sometimes", "tool_choice")):
        with pytest.raises(APIError) as e:
            plan_tools(tools, choice, None)
        assert e.value.param == param and e.value.status_code == 400


def test_structured_fields_map_to_one_spec_and_bad_ones_are_400():
    assert request_spec({"type": "text"}, {}) == (None, "")
    assert request_spec({"type": "json_object"}, {})[0].kind == "json"
    spec, src = request_spec(None, {"structured_outputs": {"choice": ["a b", 'q"x']}})
    assert (spec.kind, src) == ("grammar", "structured_outputs")
    validate_spec(spec, src)
    assert request_spec(None, {"guided_regex": "[0-9]+"})[0].kind == "regex"
    with pytest.raises(APIError, match="both constrain"):
        request_spec({"type": "json_object"}, {"guided_json": {"type": "object"}})
    with pytest.raises(APIError, match="exactly one"):
        request_spec(None, {"structured_outputs": {"regex": "a", "choice": ["b"]}})
    bad = request_spec({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}, {})
    with pytest.raises(APIError) as e:
        validate_spec(*bad)
    assert e.value.param == "response_format" and 'Unsupported type "strng"' in e.value.message
    assert "/project" not in e.value.message and "json_schema_converter" not in e.value.message
    with pytest.raises(APIError, match="parenthesis is not closed"):
        validate_spec(*request_spec(None, {"guided_regex": "(ab"}))
    with pytest.raises(APIError, match='Rule "foo" is not defined'):
        validate_spec(*request_spec(None, {"structured_outputs": {"grammar": "root ::= foo"}}))


def test_family_formats_are_table_driven_with_grammar_only_by_default():
    assert FAMILY_FORMATS == {"qwen2_vl": "hermes", "pixtral": "mistral", "mllama": "llama3_json"}
    for family in ("molmo", "nvlm_d", None):  # no tool format in their templates
        fmt = tool_format(family)
        assert type(fmt) is ToolFormat and not fmt.supports_auto
    assert isinstance(tool_format("molmo", override="hermes"), Hermes)


@pytest.mark.parametrize("fmt, text, content, calls", [
    (Hermes(), 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n'
                '{"name": "g", "arguments": {}}\n</tool_call>', "Sure.", [("f", {"a": 1}), ("g", {})]),
    (Hermes(), "no call here", "no call here", []),
    (Hermes(), "<tool_call>\n{broken</tool_call>", "<tool_call>\n{broken</tool_call>", []),
    (MistralTools(), '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 2}}]', None, [("f", {"a": 2})]),
    (Llama3Json(), '{"name": "f", "parameters": {"a": 3}}', None, [("f", {"a": 3})]),
    (Llama3Json(), '<|python_tag|>{"name": "f", "parameters": {"a": 3}}; {"name": "g", "parameters": {}}', None,
     [("f", {"a": 3}), ("g", {})]),
    (Llama3Json(), "It is sunny.", "It is sunny.", []),
])
def test_auto_outputs_parse_into_calls(fmt, text, content, calls):
    got_content, got = fmt.parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


def test_hermes_renders_tools_and_history_for_a_template_without_tools():
    plan = plan_tools([F], "auto", None)
    conv = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                                                                 "function": {"name": "f", "arguments": {"a": 1}}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c"}, {"role": "tool", "content": "43", "tool_call_id": "d"}]
    out, kwargs = Hermes().prepare(conv, plan)
    assert kwargs == {} and out[0]["role"] == "system" and '"name": "f"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>\n<tool_response>\n43\n"
                                                 "</tool_response>"}


def test_streamed_required_calls_reassemble_to_the_whole_output():
    text = '[{"name":"f","parameters":{"a":12,"s":"x}\\"]"}},{"name":"g","parameters":{}}]'
    plan = plan_tools([F, G], "required", None)
    streamer = ToolStreamer(plan, ToolFormat())
    calls: dict[int, dict] = {}
    for i in range(0, len(text), 3):  # 3-character deltas cut through names and strings
        _, deltas = streamer.feed(text[i:i + 3])
        for d in deltas:
            if "id" in d:
                assert d["index"] not in calls
                calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("f", {"a": 12, "s": 'x}"]'}), ("g", {})]
    assert [(c.name, text[c.args_start:c.args_end]) for c in scan_call_array(text)] == [
        ("f", '{"a":12,"s":"x}\\"]"}'), ("g", "{}")]


def test_streamed_auto_content_stops_at_the_marker_and_calls_come_at_the_end():
    streamer = ToolStreamer(plan_tools([F], "auto", None), Hermes())
    text = 'Let me check.<tool_call>\n{"name": "f", "arguments": {"a": 5}}\n</tool_call>'
    sent = "".join(streamer.feed(text[i:i + 4])[0] for i in range(0, len(text), 4))
    assert sent == "Let me check."
    _, calls = streamer.finish()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("f", {"a": 5})]


async def test_auto_tool_calls_through_the_api_with_a_format_flag(engine, make_client):
    engine.max_model_len = 4096  # the tools in the system message make a long prompt
    engine.response_text = 'Checking.<tool_call>\n{"name": "f", "arguments": {"a": 7}}\n</tool_call>'
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [F]}
    async with make_client(tool_call_format="hermes") as client:
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        r = r.json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
        call = choice["message"]["tool_calls"][0]
        assert call["id"].startswith("call_") and call["function"]["name"] == "f"
        assert json.loads(call["function"]["arguments"]) == {"a": 7}
        # The tools reached the prompt, in the format's system message.
        assert "<tools>" in engine.chat_calls[-1]["conversation"][0]["content"]
        r = await client.post("/v1/chat/completions", json=dict(body, stream=True))
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        deltas = [e["choices"][0] for e in events if e["choices"]]
        assert "".join(d["delta"].get("content") or "" for d in deltas) == "Checking."
        calls = [t for d in deltas for t in d["delta"].get("tool_calls", [])]
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("f", {"a": 7})]
        assert deltas[-1]["finish_reason"] == "tool_calls"
    async with make_client() as client:  # no format for this engine: auto is refused, required is not
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "required" in r.json()["error"]["message"]
        r = await client.post("/v1/chat/completions", json=dict(body, tool_choice="required"))
        assert r.status_code == 200 and engine.params[-1].structured is not None
