"""Structured outputs and tool calls on the real server, one per family, through the official
openai client. The tiny checkpoints' weights are random, so their free text is noise: every
valid JSON answer and every valid tool call below exists only because the grammar made it."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from vlmserve.models.registry import make_tiny_model
from tests.utils import image, launch_server, png_data_url

FAMILIES = {
    "qwen2_vl": ("qwen2_vl", {}),
    "pixtral_hf": ("pixtral", {"format": "hf"}),
    "pixtral_mistral": ("pixtral", {"format": "mistral"}),
    "mllama": ("mllama", {}),
    # No tool format in their templates: required and named calls through the grammar only.
    "molmo": ("molmo", {}),
    "nvlm_d": ("nvlm_d", {}),
}
GRAMMAR_ONLY = {"molmo", "nvlm_d"}
# Bounded on purpose (enums, integer ranges, short strings, few items): a random model then
# closes the JSON within a small max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "box": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                                 "y": {"type": "integer", "minimum": 0, "maximum": 99}},
                "required": ["x", "y"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
        "score": {"anyOf": [{"type": "boolean"}, {"type": "null"}, {"type": "integer", "minimum": 0, "maximum": 9}]},
    },
    "required": ["kind", "box", "tags", "score"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
    "additionalProperties": False}}}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
MAX_TOKENS = 128


@pytest.fixture(scope="module", params=list(FAMILIES))
def client(request, tmp_path_factory):
    family, kwargs = FAMILIES[request.param]
    ckpt = make_tiny_model(family, tmp_path_factory.mktemp(request.param), seed=1, **kwargs)
    with launch_server(ckpt, tmp_path_factory.mktemp(f"{request.param}_server"), "--num-cross-kv-blocks", "1024",
                       "--engine-mode", "process", "--max-model-len", "4096") as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        client.family_id = request.param
        yield client


def _messages(question: str, with_image: bool = True) -> list[dict]:
    parts = [{"type": "text", "text": question}]
    if with_image:
        parts.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(image(64, 48, 3))}})
    return [{"role": "user", "content": parts}]


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_json_schema_and_json_object_answers_are_valid(client):
    r = client.chat.completions.create(model="tiny", messages=_messages("Describe it as JSON."), n=2,
                                       max_tokens=MAX_TOKENS, temperature=1.0, seed=5,
                                       response_format=_schema_format(SCHEMA), extra_body={"top_k": -1, "top_p": 1.0})
    assert len(r.choices) == 2
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        assert " " not in choice.message.content.replace('" ', "").split('"')[0]  # compact: no padding

    stream = client.chat.completions.create(model="tiny", messages=_messages("Describe it as JSON."),
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                            response_format=_schema_format(SCHEMA))
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)
    # Streamed and not, the same greedy answer.
    full = client.chat.completions.create(model="tiny", messages=_messages("Describe it as JSON."),
                                          max_tokens=MAX_TOKENS, temperature=0, response_format=_schema_format(SCHEMA))
    assert full.choices[0].message.content == text

    r = client.chat.completions.create(model="tiny", messages=_messages("Any JSON object.", with_image=False),
                                       max_tokens=MAX_TOKENS, temperature=0, response_format={"type": "json_object"},
                                       extra_body={"min_tokens": 0})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # a random model may stay inside one long string; what it wrote is still JSON so far
        assert r.choices[0].message.content.startswith("{")


def _check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


def test_named_required_and_none_tool_choices(client):
    messages = _messages("What is the weather in Paris?")
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME], tool_choice=named,
                                       max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    _check_calls(r.choices[0].message.tool_calls, {"get_weather"})

    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=MAX_TOKENS, temperature=0, parallel_tool_calls=False)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert len(r.choices[0].message.tool_calls) == 1
    _check_calls(r.choices[0].message.tool_calls, {"get_weather", "get_time"})

    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    if client.family_id in GRAMMAR_ONLY:  # "auto" needs a tool format the template lacks: a 400 that says so
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=8)
        assert e.value.body["param"] == "tool_choice" and "required" in e.value.body["message"]

    # Streamed: id and name once per call, then argument fragments that reassemble.
    for choice, names in ((named, {"get_weather"}), ("required", {"get_weather", "get_time"})):
        stream = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                                tool_choice=choice, max_tokens=MAX_TOKENS, temperature=0, stream=True)
        calls: dict[int, dict] = {}
        finish = None
        for chunk in stream:
            for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                if delta.id is not None:
                    assert delta.index not in calls  # announced once
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert finish == "tool_calls" and calls
        for call in calls.values():
            assert call["name"] in names
            jsonschema.validate(json.loads(call["arguments"]), TOOL_SCHEMAS[call["name"]])
        full = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, TIME],
                                              tool_choice=choice, max_tokens=MAX_TOKENS, temperature=0)
        assert [(c.function.name, c.function.arguments) for c in full.choices[0].message.tool_calls] == [
            (c["name"], c["arguments"]) for c in calls.values()]

    # The call and its result go back through the family's template.
    call = r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice=named,
                                              max_tokens=MAX_TOKENS, temperature=0).choices[0].message.tool_calls[0]
    history = [*messages,
               {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
               {"role": "user", "content": "And in Rome?"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], tool_choice=named,
                                       max_tokens=MAX_TOKENS, temperature=0)
    _check_calls(r.choices[0].message.tool_calls, {"get_weather"})


@pytest.mark.parametrize("client", ["qwen2_vl"], indirect=True)
def test_mixed_batch_vllm_fields_and_invalid_schemas(client):
    from concurrent.futures import ThreadPoolExecutor

    free = dict(model="tiny", messages=_messages("Say something."), max_tokens=16, temperature=0,
                extra_body={"ignore_eos": True})
    constrained = dict(model="tiny", messages=_messages("Describe it as JSON."), max_tokens=MAX_TOKENS,
                       temperature=0, response_format=_schema_format(SCHEMA))
    alone = [client.chat.completions.create(**kw).choices[0].message.content for kw in (free, constrained)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda kw: client.chat.completions.create(**kw).choices[0].message.content,
                                 [free, constrained] * 3))
    assert together == alone * 3

    for body, check in (
        ({"structured_outputs": {"choice": ["red", "green", "light blue"]}}, lambda t: t in ("red", "green", "light blue")),
        ({"structured_outputs": {"regex": "[0-9]{2}-[a-z]{3}"}}, lambda t: re.fullmatch("[0-9]{2}-[a-z]{3}", t)),
        ({"structured_outputs": {"grammar": 'root ::= "(" [a-c]+ ")"'}}, lambda t: re.fullmatch(r"\([a-c]+\)", t)),
        ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ):
        r = client.chat.completions.create(model="tiny", messages=_messages("Pick.", with_image=False),
                                           max_tokens=MAX_TOKENS, temperature=0, extra_body=body)
        assert r.choices[0].finish_reason == "stop" and check(r.choices[0].message.content), (body, r)
    r = client.completions.create(model="tiny", prompt="The code is", max_tokens=16, temperature=0,
                                  extra_body={"guided_regex": "[A-Z]{4}"})
    assert re.fullmatch("[A-Z]{4}", r.choices[0].text) and r.choices[0].finish_reason == "stop"

    for kwargs, param, words in (
        ({"response_format": _schema_format({"type": "object", "properties": {"a": {"type": "strng"}}})},
         "response_format", 'Unsupported type "strng"'),
        ({"extra_body": {"structured_outputs": {"regex": "(ab"}}}, "structured_outputs", "parenthesis"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "not in tools"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=_messages("x", with_image=False), max_tokens=8,
                                           **kwargs)
        assert e.value.body["param"] == param and words in e.value.body["message"], e.value.body
