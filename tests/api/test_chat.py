from __future__ import annotations

import asyncio

from PIL import Image

from vlmserve.api.app import create_app
from vlmserve.config import ServerConfig
from tests.api.helpers import MODEL, drive_asgi, parse_sse, png_data_url

FULL = "Hello w\u00f6rld! \u4f60\u597d \U0001f642 The end."
USER = [{"role": "user", "content": "Say hi"}]


def _n_response_tokens(engine) -> int:
    return len(engine.tokenizer.encode(FULL, add_special_tokens=False)) + 1  # + EOS


async def test_chat_completion_with_the_openai_client(oai, engine):
    r = await oai.chat.completions.create(model=MODEL, messages=USER)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == FULL
    assert r.choices[0].finish_reason == "stop"
    prompt_len = len(engine.prompts[-1].prompt_token_ids)
    assert r.usage.prompt_tokens == prompt_len
    assert r.usage.completion_tokens == _n_response_tokens(engine)
    assert r.usage.total_tokens == prompt_len + _n_response_tokens(engine)
    # No max_tokens: the budget is the rest of the context.
    assert engine.last_params.max_tokens == engine.max_model_len - prompt_len


async def test_streaming_chat_with_usage(oai, engine):
    stream = await oai.chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == FULL
    assert all("\ufffd" not in d for d in deltas)  # split characters are never sent half-done
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == _n_response_tokens(engine)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_stream_without_include_usage_has_no_usage_field(client):
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_n_choices_run_as_separate_engine_requests_with_offset_seeds(oai, engine):
    r = await oai.chat.completions.create(model=MODEL, messages=USER, n=2, seed=7, max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 6
    assert sorted(engine.request_ids) == [f"{r.id}-0", f"{r.id}-1"]
    assert sorted(p.seed for p in engine.params) == [7, 8]
    assert all(p.n == 1 for p in engine.params)


async def test_n_choices_streaming_interleaves_both_choices(oai):
    stream = await oai.chat.completions.create(model=MODEL, messages=USER, n=2, stream=True)
    texts = {0: "", 1: ""}
    finish = {}
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {0: FULL, 1: FULL} and finish == {0: "stop", 1: "stop"}


async def test_stop_string_truncates_streamed_and_full_output(oai, engine):
    r = await oai.chat.completions.create(model=MODEL, messages=USER, stop="The end")
    assert r.choices[0].message.content == "Hello w\u00f6rld! \u4f60\u597d \U0001f642 "
    assert r.choices[0].finish_reason == "stop"
    assert engine.last_params.stop == ("The end",)
    stream = await oai.chat.completions.create(model=MODEL, messages=USER, stop=["The end"], stream=True)
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed == r.choices[0].message.content


async def test_include_stop_str_in_output_keeps_the_stop(client):
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": USER, "stop": ["w\u00f6r"], "include_stop_str_in_output": True})
    assert r.json()["choices"][0]["message"]["content"] == "Hello w\u00f6r"


async def test_max_tokens_ends_with_length(oai):
    r = await oai.chat.completions.create(model=MODEL, messages=USER, max_completion_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == "Hello "
    assert r.usage.completion_tokens == 2


async def test_logprobs_render_tokens_bytes_and_top_alternatives(oai, engine):
    r = await oai.chat.completions.create(model=MODEL, messages=USER, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == _n_response_tokens(engine)
    # Bytes of consecutive tokens join into the exact UTF-8 text, split characters included.
    joined = b"".join(bytes(e.bytes) for e in content[:-1])
    assert joined.decode("utf-8") == FULL
    assert content[-1].token == "<|endoftext|>"
    assert all(e.logprob == -0.25 and len(e.top_logprobs) == 3 for e in content)
    assert content[0].top_logprobs[2].logprob == -9999.0  # -inf is not valid JSON
    assert engine.last_params.logprobs == 3


async def test_streamed_logprobs_cover_every_token(oai, engine):
    stream = await oai.chat.completions.create(model=MODEL, messages=USER, logprobs=True, stream=True)
    entries = [e async for c in stream if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]
    assert len(entries) == _n_response_tokens(engine)
    assert all(e.top_logprobs == [] for e in entries)


async def test_without_logprobs_none_are_requested(oai, engine):
    r = await oai.chat.completions.create(model=MODEL, messages=USER)
    assert r.choices[0].logprobs is None and engine.last_params.logprobs is None


async def test_images_are_loaded_in_order_and_replaced_by_placeholders(client, engine):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url((255, 0, 0)), "detail": "low"}},
            {"type": "text", "text": "and"},
            {"type": "image_url", "image_url": png_data_url((0, 0, 255))},
        ]},
    ]
    r = await client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert r.status_code == 200, r.text
    call = engine.chat_calls[-1]
    assert call["conversation"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
    ]
    images: list[Image.Image] = call["images"]
    assert [im.getpixel((0, 0)) for im in images] == [(255, 0, 0), (0, 0, 255)]
    assert call["videos"] is None


async def test_template_options_are_forwarded(client, engine):
    r = await client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": USER, "add_generation_prompt": False,
        "chat_template_kwargs": {"enable_thinking": False}, "some_future_field": 1})
    assert r.status_code == 200  # unknown fields are ignored
    assert engine.chat_calls[-1]["add_generation_prompt"] is False
    assert engine.chat_calls[-1]["chat_template_kwargs"] == {"enable_thinking": False}


async def test_generation_defaults_apply_unless_the_request_overrides(make_client, engine):
    engine.defaults = {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    async with make_client() as c:
        await c.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "top_p": 0.5})
        p = engine.last_params
        assert (p.temperature, p.top_k, p.top_p) == (0.7, 20, 0.5)
        await c.post("/v1/chat/completions", json={"model": MODEL, "messages": USER, "temperature": 0})
        assert engine.last_params.greedy


async def test_client_disconnect_mid_stream_aborts_the_engine_request(engine):
    engine.block_after_steps = 3  # the third step never comes: the client leaves first
    app = create_app(engine, ServerConfig())
    disconnect = asyncio.Event()

    def on_body(chunks: list[bytes]) -> None:
        if any(b'"content":"Hello"' in c for c in chunks):
            disconnect.set()

    status, chunks = await drive_asgi(app, "/v1/chat/completions",
                                      {"model": MODEL, "messages": USER, "stream": True}, disconnect, on_body)
    assert status == 200
    assert engine.aborted == engine.request_ids and len(engine.aborted) == 1
    assert engine.finished == []


async def test_client_disconnect_during_a_non_streaming_request_aborts_it(engine):
    engine.block_after_steps = 2
    app = create_app(engine, ServerConfig())
    disconnect = asyncio.Event()

    async def leave_when_generating() -> None:
        await engine.reached_block.wait()
        disconnect.set()

    watcher = asyncio.create_task(leave_when_generating())
    status, _ = await drive_asgi(app, "/v1/chat/completions",
                                 {"model": MODEL, "messages": USER, "n": 2}, disconnect)
    await watcher
    assert status == 499
    assert sorted(engine.aborted) == sorted(engine.request_ids) and len(engine.aborted) == 2


async def test_models_and_health(client, engine):
    r = await client.get("/v1/models")
    assert r.json()["object"] == "list"
    assert [(m["id"], m["object"]) for m in r.json()["data"]] == [(MODEL, "model")]
    assert (await client.get("/health")).status_code == 200
    engine.healthy = False
    r = await client.get("/health")
    assert r.status_code == 503 and "not healthy" in r.json()["error"]["message"]
