from __future__ import annotations

import pytest

from vlmserve.api.errors import APIError
from vlmserve.api.routes.completions import single_prompt
from tests.api.helpers import MODEL, parse_sse

FULL = "Hello w\u00f6rld! \u4f60\u597d \U0001f642 The end."


async def test_text_completion_with_the_openai_client(oai, engine):
    r = await oai.completions.create(model=MODEL, prompt="The quick brown", max_tokens=5)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == "Hello w\u00f6"
    assert r.choices[0].finish_reason == "length"
    assert engine.completion_prompts == ["The quick brown"]
    assert r.usage.prompt_tokens == len(engine.tokenizer.encode("The quick brown", add_special_tokens=False))
    assert r.usage.completion_tokens == 5


async def test_token_id_prompt_is_passed_through(oai, engine):
    ids = engine.tokenizer.encode("hello there", add_special_tokens=False)
    r = await oai.completions.create(model=MODEL, prompt=ids, max_tokens=2)
    assert engine.completion_prompts == [ids]
    assert r.usage.prompt_tokens == len(ids)


async def test_streaming_completion_with_usage(oai, engine):
    stream = await oai.completions.create(model=MODEL, prompt="hi", stream=True,
                                          stream_options={"include_usage": True}, stop=["The"])
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "Hello w\u00f6rld! \u4f60\u597d \U0001f642 "
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0


async def test_legacy_logprobs_shape(client, engine):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert lp["tokens"][0] == "Hello"
    assert lp["text_offset"][:2] == [0, len("Hello")]
    assert all(len(top) >= 1 and lp["tokens"][i] in top for i, top in enumerate(lp["top_logprobs"]))


async def test_streamed_legacy_logprobs_offsets_continue_across_chunks(client):
    r = await client.post("/v1/completions", json={
        "model": MODEL, "prompt": "hi", "max_tokens": 3, "logprobs": 0, "stream": True})
    offsets = [o for e in parse_sse(r.text)[:-1] for c in e["choices"] if c["logprobs"]
               for o in c["logprobs"]["text_offset"]]
    assert offsets == [0, len("Hello"), len("Hello ")]


async def test_n_completions(oai, engine):
    r = await oai.completions.create(model=MODEL, prompt="hi", n=3, max_tokens=1)
    assert [c.index for c in r.choices] == [0, 1, 2] and all(c.text == "Hello" for c in r.choices)
    assert len(engine.request_ids) == 3


@pytest.mark.parametrize("payload, param", [
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": []}, "prompt"),
])
async def test_bad_completion_requests_are_400_naming_the_param(client, payload, param):
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", **payload})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_single_prompt_unwraps_a_one_string_list_and_keeps_ids():
    assert single_prompt(["only"]) == "only"
    assert single_prompt([1, 2, 3]) == [1, 2, 3]
    assert single_prompt("text") == "text"
    with pytest.raises(APIError, match="non-negative"):
        single_prompt([1, -2])
