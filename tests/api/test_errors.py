from __future__ import annotations

import asyncio
import re

import httpx
import openai
import pytest

from vlmserve.api.app import create_app
from vlmserve.config import ServerConfig
from vlmserve.multimodal.media import MediaError, MediaLoader
from tests.api.helpers import API_KEY, MODEL, parse_sse, png_data_url

USER = [{"role": "user", "content": "Say hi"}]


def _chat(**kw):
    return {"model": MODEL, "messages": USER, **kw}


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


async def test_api_key_guards_v1_but_not_health(make_client):
    async with make_client(api_key=API_KEY) as c:
        err = _error(await c.post("/v1/chat/completions", json=_chat()), 401)
        assert "missing API key" in err["message"]
        r = await c.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert "invalid API key" in _error(r, 401)["message"]
        assert r.headers["www-authenticate"] == "Bearer"
        # Refused before the body is read: no schema error for an unauthenticated client.
        _error(await c.post("/v1/chat/completions", json={"junk": 1}), 401)
        r = await c.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200
        assert (await c.get("/health")).status_code == 200


async def test_openai_client_with_a_wrong_key_gets_authentication_error(make_client):
    http = make_client(api_key=API_KEY)
    async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="nope", http_client=http, max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()


async def test_unknown_model_is_404_model_not_found(oai):
    with pytest.raises(openai.NotFoundError) as info:
        await oai.chat.completions.create(model="gpt-4o", messages=USER)
    assert info.value.code == "model_not_found"
    assert MODEL in info.value.message


async def test_invalid_temperature_is_400_with_the_allowed_range(client):
    err = _error(await client.post("/v1/chat/completions", json=_chat(temperature=-1)), 400)
    assert err["param"] == "temperature" and "[0, 2]" in err["message"]
    err = _error(await client.post("/v1/chat/completions", json=_chat(top_p=1.5)), 400)
    assert err["param"] == "top_p" and "(0, 1]" in err["message"]
    err = _error(await client.post("/v1/chat/completions", json=_chat(logprobs=True, top_logprobs=50)), 400)
    assert err["param"] == "top_logprobs" and "[0, 20]" in err["message"]


async def test_schema_errors_are_422_with_the_field_path(client):
    err = _error(await client.post("/v1/chat/completions", json=_chat(temperature="hot")), 422)
    assert err["param"] == "temperature"
    err = _error(await client.post("/v1/chat/completions", json={"messages": USER}), 422)
    assert err["param"] == "model"
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"no_url": 1}}]}]
    err = _error(await client.post("/v1/chat/completions", json={"model": MODEL, "messages": bad}), 422)
    assert err["param"] == "messages[0].content[0].image_url.url" and "Field required" in err["message"]
    err = _error(await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "x"}]}), 422)
    assert err["param"] == "messages[0].role"


async def test_malformed_json_is_400(client):
    r = await client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in _error(r, 400)["message"]


async def test_body_over_the_limit_is_413_by_content_length(make_client, engine):
    async with make_client(max_request_body_bytes=1000) as c:
        big = [{"role": "user", "content": "x" * 5000}]
        err = _error(await c.post("/v1/chat/completions", json={"model": MODEL, "messages": big}), 413)
        assert "1000 bytes" in err["message"]
        assert engine.chat_calls == []


async def test_body_over_the_limit_is_413_when_streamed_without_length(make_client, engine):
    async def body():
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}]}'

    async with make_client(max_request_body_bytes=1000) as c:
        r = await c.post("/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
        assert "1000 bytes" in _error(r, 413)["message"]
        assert engine.chat_calls == []
        small = await c.post("/v1/chat/completions", json=_chat())
        assert small.status_code == 200


async def test_bad_base64_image_is_400_naming_the_part(client, engine):
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}]}]
    err = _error(await client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs}), 400)
    assert err["message"].startswith("messages[0].content[1].image_url")
    assert engine.chat_calls == []


async def test_render_value_error_is_400_with_its_message(client, engine):
    engine.render_error = ValueError("the prompt has 9000 tokens, more than the 4096 the model takes")
    err = _error(await client.post("/v1/chat/completions", json=_chat()), 400)
    assert err["message"] == "the prompt has 9000 tokens, more than the 4096 the model takes"
    err = _error(await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 400)
    assert err["param"] == "prompt"


async def test_max_tokens_beyond_the_context_names_both_numbers(client, engine):
    err = _error(await client.post("/v1/chat/completions", json=_chat(max_tokens=100_000)), 400)
    m = re.search(r"max_tokens of 100000 plus the prompt's (\d+) tokens .* context of (\d+) tokens.* at most (\d+)",
                  err["message"])
    assert m is not None, err["message"]
    prompt_len, context, room = map(int, m.groups())
    assert context == engine.max_model_len and prompt_len + room == context and prompt_len > 0
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded"
    assert engine.params == []


@pytest.mark.parametrize("extra, param", [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"top_logprobs": 2}, "top_logprobs"),
    # vLLM's extensions that we do not implement.
    ({"prompt_logprobs": 1}, "prompt_logprobs"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),
    ({"continue_final_message": True}, "continue_final_message"),
    ({"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"),
    ({"priority": 3}, "priority"),
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "stream_options"),
])
async def test_unsupported_behaviour_changing_params_are_400(client, extra, param):
    err = _error(await client.post("/v1/chat/completions", json=_chat(**extra)), 400)
    assert err["param"] == param and err["code"] == "unsupported_parameter"


async def test_harmless_values_of_those_params_are_accepted(client):
    r = await client.post("/v1/chat/completions", json=_chat(
        tool_choice="none", response_format={"type": "text"}, logit_bias={}, modalities=["text"], user="u1"))
    assert r.status_code == 200, r.text
    # vLLM-based tools send its extensions with their defaults filled in; unknown fields pass.
    r = await client.post("/v1/chat/completions", json=_chat(
        use_beam_search=False, length_penalty=1.0, priority=0, prompt_logprobs=None, best_of=1, echo=False,
        continue_final_message=False, guided_json=None, bad_words=[], cache_salt="s", some_future_field=1))
    assert r.status_code == 200, r.text


async def test_video_is_400_when_the_media_loader_cannot_load_video(engine):
    class ImageOnly:
        async def load_image(self, url: str, *accounted):
            return await MediaLoader().load_image(url, *accounted)

    app = create_app(engine, ServerConfig(), media=ImageOnly())  # type: ignore[arg-type]
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        err = _error(await c.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs}), 400)
    assert "not supported yet" in err["message"] and err["param"] == "messages[0].content[0].video_url"


async def test_video_for_an_image_only_model_is_400_before_any_fetch(client, engine):
    engine.modalities = ("image",)
    # An http URL no test may reach: the refusal must come before any fetch is attempted.
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": png_data_url()},
        {"type": "video_url", "video_url": {"url": "http://203.0.113.7/clip.mp4"}},
    ]}]
    err = _error(await client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs}), 400)
    assert err["code"] == "unsupported_modality" and err["param"] == "messages[0].content[1].video_url"
    assert "does not take video" in err["message"] and "takes image" in err["message"]
    assert not engine.chat_calls


async def test_media_error_status_is_kept(engine):
    class Refusing:
        async def load_image(self, url: str, *accounted):
            raise MediaError("image host not allowed", status_code=403)

    app = create_app(engine, ServerConfig(), media=Refusing())  # type: ignore[arg-type]
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": png_data_url()}]}]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        err = _error(await c.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs}), 403)
    assert "image host not allowed" in err["message"]


async def test_engine_fault_is_500_without_internals(client, engine):
    engine.fail_after_steps = 2
    err = _error(await client.post("/v1/chat/completions", json=_chat()), 500)
    assert "secret" not in err["message"] and "CUDA" not in err["message"]


async def test_engine_fault_mid_stream_becomes_an_error_event(client, engine):
    engine.fail_after_steps = 3
    r = await client.post("/v1/chat/completions", json=_chat(stream=True))
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["type"] == "server_error" and "secret" not in events[-2]["error"]["message"]
    assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events[:-2])


async def test_requests_in_flight_when_the_engine_dies_are_a_500_engine_error(client, engine):
    engine.dead_after_steps = 2
    err = _error(await client.post("/v1/chat/completions", json=_chat()), 500)
    assert err["code"] == "engine_error" and "/health" in err["message"] and "secret" not in err["message"]
    # Once dead, a new request, streamed or not, is a 503 before any response starts.
    r = await client.post("/v1/chat/completions", json=_chat(stream=True))
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unhealthy"
    assert (await client.get("/health")).status_code == 503


async def test_engine_abort_never_reaches_the_client_as_a_finish_reason(client, engine):
    engine.abort_after_steps = 2
    err = _error(await client.post("/v1/chat/completions", json=_chat()), 503)
    assert "retry" in err["message"]
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True})
    assert "abort" not in [c.get("finish_reason") for e in parse_sse(r.text)[:-1] for c in e.get("choices", [])]


async def test_a_failed_engine_step_is_a_500_for_its_request_and_the_next_one_is_served(client, engine):
    engine.error_after_steps = 2
    err = _error(await client.post("/v1/chat/completions", json=_chat()), 500)
    assert err["code"] == "engine_error" and "retry" in err["message"]
    r = await client.post("/v1/chat/completions", json=_chat(stream=True))
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_error"
    assert "error" not in [c.get("finish_reason") for e in events[:-2] for c in e.get("choices", [])]
    engine.error_after_steps = None
    assert (await client.post("/v1/chat/completions", json=_chat())).status_code == 200


async def test_unknown_route_is_404_in_the_openai_shape(client):
    assert "no such route" in _error(await client.get("/v1/nope"), 404)["message"]


@pytest.mark.parametrize("message, param", [
    ({"role": "function", "content": "42", "name": "f"}, "messages[0].role"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "messages[0].content[0].type"),
])
async def test_unsupported_message_kinds_are_400(client, message, param):
    err = _error(await client.post("/v1/chat/completions", json={"model": MODEL, "messages": [message]}), 400)
    assert err["param"] == param


async def test_more_images_than_limit_mm_per_prompt_is_refused_before_loading(make_client, engine):
    from tests.api.helpers import MODEL, png_data_url

    parts = [{"type": "image_url", "image_url": {"url": png_data_url()}} for _ in range(3)]
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts + [{"type": "text", "text": "hi"}]}]}
    async with make_client(limit_mm_per_prompt={"image": 2}) as c:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400
        err = r.json()["error"]
        assert "3 images" in err["message"] and "at most 2" in err["message"]
        assert "--limit-mm-per-prompt" in err["message"]
        body["messages"][0]["content"] = parts[:2] + [{"type": "text", "text": "hi"}]
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200


async def test_past_max_pending_requests_new_ones_get_503_with_retry_after(make_client, engine):
    from tests.api.helpers import MODEL

    engine.block_after_steps = 1  # every request waits in the engine until `release`
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with make_client(max_pending_requests=5) as c:
        # 2 + 3: n counts each engine request, as the engine does.
        held = [asyncio.create_task(c.post("/v1/chat/completions", json={**body, "n": 2})),
                asyncio.create_task(c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2,
                                                                    "n": 3}))]
        while len(engine.request_ids) < 5:
            await asyncio.sleep(0.01)
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "--max-pending-requests 5" in r.json()["error"]["message"]
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503
        engine.release.set()
        assert [t.status_code for t in await asyncio.gather(*held)] == [200, 200]
        # All finished: the count is back to zero and requests are admitted again.
        assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        assert (await c.get("/v1/load")).json()["num_requests_in_flight"] == 0


async def test_top_k_past_int64_is_400_before_reaching_the_engine(client, engine):
    # 2**70 used to reach the sampler's int64 tensor and kill the engine for every request.
    err = _error(await client.post("/v1/chat/completions", json=_chat(top_k=2**70)), 400)
    assert err["param"] == "top_k" and "2147483647" in err["message"]
    assert engine.params == []
    assert (await client.post("/v1/chat/completions", json=_chat(top_k=10**9))).status_code == 200


async def test_stop_lists_past_their_caps_are_400_naming_the_cap(client, engine):
    from vlmserve.api.sampling import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS

    stops = [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]
    err = _error(await client.post("/v1/chat/completions", json=_chat(stop=stops)), 400)
    assert err["param"] == "stop" and f"at most {MAX_STOP_STRINGS}" in err["message"]
    ids = list(range(1000, 1000 + MAX_STOP_TOKEN_IDS + 1))
    err = _error(await client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stop_token_ids": ids}), 400)
    assert err["param"] == "stop_token_ids" and f"at most {MAX_STOP_TOKEN_IDS}" in err["message"]
    assert engine.params == []
    assert (await client.post("/v1/chat/completions", json=_chat(stop=stops[:100]))).status_code == 200


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800"}]}',
     "messages[0].content"),
    ("/v1/chat/completions",
     b'{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udc00"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/completions", b'{"model": "%s", "prompt": "\\udfff"}', "prompt"),
])
async def test_lone_surrogate_in_text_is_400_naming_the_field(client, engine, path, body, param):
    r = await client.post(path, content=body % MODEL.encode(), headers={"content-type": "application/json"})
    err = _error(r, 400)
    assert err["param"] == param and err["code"] == "invalid_unicode" and "lone surrogate" in err["message"]
    assert engine.chat_calls == []


@pytest.mark.parametrize("body, message", [
    (b"", "request body is empty"),
    (b'{"model": "x", "messages": "\xff\xfe"}', "not valid UTF-8"),
    (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too deeply"),
])
async def test_unparseable_bodies_are_400_saying_why(client, body, message):
    r = await client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    err = _error(r, 400)
    assert message in err["message"] and err["code"] == "invalid_json"


async def test_wrong_method_is_405_naming_the_allowed_one(client):
    err = _error(await client.get("/v1/chat/completions"), 405)
    assert "GET" in err["message"] and "use POST" in err["message"]


async def test_stream_options_without_stream_is_400(client, engine):
    err = _error(await client.post("/v1/chat/completions", json=_chat(stream_options={"include_usage": True})), 400)
    assert err["param"] == "stream_options" and "stream: true" in err["message"]
    assert engine.params == []


async def test_media_errors_name_the_part_not_just_the_kind(client):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "x"},
                                          {"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}]}]
    err = _error(await client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs}), 400)
    assert err["param"] == "messages[0].content[1].image_url" and "scheme 'ftp'" in err["message"]


async def test_bearer_scheme_is_case_insensitive_and_other_schemes_are_named(make_client):
    async with make_client(api_key=API_KEY) as c:
        r = await c.get("/v1/models", headers={"Authorization": f"bearer {API_KEY}"})
        assert r.status_code == 200
        r = await c.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"})
        assert "Bearer scheme" in _error(r, 401)["message"]
