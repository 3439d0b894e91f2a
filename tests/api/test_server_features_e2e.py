"""Every chat/completions feature through the official openai client against the real
server on loopback (`vlmserve serve` in a subprocess, API key from the environment)."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import time
import zlib

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.utils import image, launch_server, png_data_url

KEY = "test-key-123"
# The checkpoint's generation_config.json (as Qwen2-VL publishes it) defaults to top_k=1 and
# top_p=0.001, which a request must override to sample freely.
UNRESTRICTED = {"ignore_eos": True, "top_k": -1}


@pytest.fixture(scope="module", params=["process", "thread"])
def base(request, tiny_ckpt, tmp_path_factory):
    with launch_server(
        tiny_ckpt, tmp_path_factory.mktemp("server"), "--limit-mm-per-prompt", "image=4,video=1",
        "--engine-mode", request.param,
        env={"VLMSERVE_API_KEY": KEY},
    ) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)


def chat(text: str, img=None):
    content = [{"type": "text", "text": text}]
    if img is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(img)}})
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]


def test_streaming_n2_with_usage(client):
    chunks = list(client.chat.completions.create(
        model="tiny", messages=chat("Describe it.", image(64, 64, 1)), n=2, max_tokens=6, temperature=1.0, seed=3,
        stream=True, stream_options={"include_usage": True},
    ))
    texts = {0: "", 1: ""}
    finish = {}
    for c in chunks[:-1]:
        assert c.usage is None
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert set(finish) == {0, 1}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_same_seed_same_text_and_different_seeds_differ(client):
    def sample(seed):
        r = client.chat.completions.create(model="tiny", messages=chat("Tell me something."), max_tokens=16,
                                           temperature=1.5, seed=seed, top_p=1.0, extra_body=UNRESTRICTED)
        return r.choices[0].message.content

    assert sample(11) == sample(11)
    assert len({sample(11), sample(12), sample(13)}) > 1


def test_n2_seeded_choices_differ_and_max_tokens_gives_length(client):
    r = client.chat.completions.create(model="tiny", messages=chat("Hi"), n=2, max_tokens=8, temperature=1.5,
                                       seed=5, top_p=1.0, extra_body=UNRESTRICTED)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 16
    assert r.choices[0].message.content != r.choices[1].message.content


def test_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=chat("Hi"), max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for tok in content:
        assert len(tok.top_logprobs) == 3
        assert tok.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert tok.logprob == pytest.approx(tok.top_logprobs[0].logprob, abs=1e-5)


def test_stop_string_truncates_and_reports_stop(client):
    greedy = client.chat.completions.create(model="tiny", messages=chat("Say more"), max_tokens=24, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].message.content
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 3]
    assert stop.strip(), greedy
    r = client.chat.completions.create(model="tiny", messages=chat("Say more"), max_tokens=24, temperature=0,
                                       stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == greedy[: greedy.index(stop)]


def test_penalties_and_sampling_knobs_are_accepted(client):
    r = client.chat.completions.create(
        model="tiny", messages=chat("Hi"), max_tokens=5, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, seed=1, extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_multi_turn_with_assistant_turn_and_completions_endpoint(client):
    msgs = chat("First question", image(80, 60, 2)) + [
        {"role": "assistant", "content": "An answer."},
        {"role": "user", "content": "And then?"},
    ]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens > 10
    c = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert c.object == "text_completion" and c.choices[0].finish_reason in ("stop", "length")


def test_auth_and_error_statuses(base, client):
    assert httpx.get(base + "/health").status_code == 200
    r = httpx.post(base + "/v1/chat/completions", json={"model": "tiny", "messages": chat("x")})
    assert r.status_code == 401 and r.json()["error"]["type"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=chat("x"))
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model="tiny", messages=chat("x"), tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            tool_choice={"type": "function", "function": {"name": "g"}})
    with pytest.raises(openai.BadRequestError, match="2048"):
        client.chat.completions.create(model="tiny", messages=chat("word " * 5000))
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(image(8, 8, i))}} for i in range(5)]}])


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _b64(raw: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def test_malformed_media_corpus_gets_4xx_and_the_server_keeps_serving(base):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, "PNG")
    png = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    corpus = {
        "truncated png": _b64(png[: len(png) // 2], "image/png"),
        "truncated jpeg": _b64(jpeg[: len(jpeg) // 2], "image/jpeg"),
        "random bytes": _b64(np.random.default_rng(0).bytes(500), "image/png"),
        "wrong mime": _b64(png, "text/plain"),
        "invalid base64": "data:image/png;base64,@@@not-base64@@@",
        "no base64 marker": "data:image/png," + png.hex(),
        "50000x50000 header": _b64(_png_claiming(50000, 50000), "image/png"),
        "unknown scheme": "gopher://example.com/x.png",
        "loopback url": "http://127.0.0.1:1/x.png",
        "metadata url": "http://169.254.169.254/latest/meta-data",
        "local file": "file:///etc/passwd",
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    for name, url in corpus.items():
        r = httpx.post(base + "/v1/chat/completions", headers=headers, timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        assert r.json()["error"]["message"], name
    r = httpx.post(base + "/v1/chat/completions", headers=headers, timeout=30,
                   json={"model": "tiny", "messages": chat("still there?"), "max_tokens": 2})
    assert r.status_code == 200


def test_health_stays_fast_while_16_large_images_decode(base):
    big = image(2400, 1800, 9)
    buf = io.BytesIO()
    big.save(buf, "PNG", compress_level=1)
    url = _b64(buf.getvalue(), "image/png")
    body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]}

    async def run():
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            posts = [asyncio.create_task(c.post(base + "/v1/chat/completions", json=body)) for _ in range(16)]
            await asyncio.sleep(0.3)  # the bodies are in; decoding is under way
            latencies = []
            while not all(p.done() for p in posts) and len(latencies) < 40:
                t0 = time.perf_counter()
                r = await c.get(base + "/health")
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200
                await asyncio.sleep(0.05)
            statuses = [(await p).status_code for p in posts]
            return latencies, statuses

    latencies, statuses = asyncio.run(run())
    assert all(s in (200, 400) for s in statuses), statuses  # 400: too many tokens for the context
    assert len(latencies) >= 3
    assert sorted(latencies)[len(latencies) // 2] < 0.1, latencies


def test_ops_endpoints_are_open_and_report_engine_state(base, client):
    client.chat.completions.create(model="tiny", messages=chat("count me", image(64, 64, 31)), max_tokens=3,
                                   temperature=0)
    assert httpx.get(base + "/ready").json() == {"ready": True, "phase": "serving"}
    load = httpx.get(base + "/v1/load").json()
    assert {"num_running", "num_waiting", "kv_cache_usage", "num_pending_prefill_tokens"} <= set(load)
    text = httpx.get(base + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    key = lambda name: next(k for k in values if k.startswith(name + "{") or k == name)  # noqa: E731
    assert values[key("vllm:generation_tokens_total")] >= 3
    assert values[key("vllm:prompt_tokens_total")] > 0
    assert values[key("vllm:time_to_first_token_seconds_count")] >= 1
    assert values[key("vllm:e2e_request_latency_seconds_count")] >= 1
    assert values[key("vllm:num_requests_running")] == 0
    assert values[key("vlmserve:encoder_items_total")] >= 1
    assert any(k.startswith('vllm:request_success_total{') and 'finished_reason="length"' in k for k in values)
