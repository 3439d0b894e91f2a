"""Admission control at the API: 429 + Retry-After from the estimate (or the waiting count),
decided before any media is fetched; 503 before any response starts (streamed or not) when
the engine cannot serve; rejections counted by reason in /metrics; /v1/load's signals."""

from __future__ import annotations

import pytest

from tests.api.helpers import MODEL

IMAGE_URL = "http://127.0.0.1:1/x.png"  # fetching it would be a 400 (loopback is refused)


def _body(stream: bool = False) -> dict:
    return {"model": MODEL, "max_tokens": 2, "stream": stream, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": IMAGE_URL}}, {"type": "text", "text": "what is it?"}]}]}


def _busy(engine, monkeypatch, **stats) -> None:
    monkeypatch.setattr(engine, "snapshot", lambda: dict(stats), raising=False)


def _rejections(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("vlmserve:admission_rejections_total{"):
            labels, _, value = line.rpartition(" ")
            out[labels.split('reason="')[1].split('"')[0]] = float(value)
    return out


@pytest.mark.parametrize("stream", [False, True])
async def test_estimated_wait_over_the_limit_gets_429_before_media_is_fetched(make_client, engine, monkeypatch, stream):
    # 20k token-equivalents pending at the prior's 4096/s: ~4.9 s estimated.
    _busy(engine, monkeypatch, pending_work_text=5000, pending_work_image=15000, num_waiting=3)
    async with make_client(max_queue_wait_s=2.0) as c:
        r = await c.post("/v1/chat/completions", json=_body(stream))
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "5"
        err = r.json()["error"]
        assert "--max-queue-wait-s" in err["message"] and err["code"] == "overloaded_queue_wait"
        assert engine.chat_calls == []  # nothing rendered, and the URL was never fetched (a 400)
        assert _rejections((await c.get("/metrics")).text)["queue_wait"] == 1
        load = (await c.get("/v1/load")).json()
        assert load["estimated_queue_wait_s"] == pytest.approx(20000 / 4096, rel=1e-3)
        assert load["desired_replicas"] == 5 and load["pending_prefill_tokens"]["image"] == 15000
    async with make_client(max_queue_wait_s=10.0) as c:  # under the limit: admitted, then the fetch fails
        assert (await c.post("/v1/chat/completions", json=_body(stream))).status_code == 400


async def test_waiting_requests_limit_gets_429_on_both_endpoints(make_client, engine, monkeypatch):
    _busy(engine, monkeypatch, num_waiting=8)
    async with make_client(max_waiting_requests=8) as c:
        r = await c.post("/v1/chat/completions", json=_body())
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "--max-waiting-requests 8" in r.json()["error"]["message"]
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429
        assert _rejections((await c.get("/metrics")).text)["waiting_requests"] == 2
    async with make_client(max_waiting_requests=9) as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_a_dead_engine_answers_503_before_any_response_starts(client, engine, stream):
    engine.healthy = False
    r = await client.post("/v1/chat/completions", json=_body(stream))
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
    assert "not healthy" in r.json()["error"]["message"]
    assert engine.chat_calls == []
    ready = await client.get("/ready")
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert _rejections((await client.get("/metrics")).text)["not_ready"] == 1


@pytest.mark.parametrize("phase", ["loading", "warming_up"])
async def test_a_starting_engine_answers_503_with_retry_after(client, engine, monkeypatch, phase):
    engine.healthy = phase == "warming_up"  # the core runs during the warm-up, but nobody is served yet
    monkeypatch.setattr(engine, "phase", phase, raising=False)
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert "still loading" in r.json()["error"]["message"]
    h = await client.get("/health")
    assert h.status_code == 503 and h.json()["error"]["code"] == "model_loading"
    monkeypatch.setattr(engine, "is_ready", lambda: False, raising=False)
    assert (await client.get("/ready")).json() == {"ready": False, "phase": phase}


async def test_request_params_are_observed_once_per_api_request(make_client, engine):
    from vlmserve.engine.metrics import EngineMetrics

    engine.metrics = EngineMetrics(MODEL, dict, max_model_len=512)
    async with make_client() as c:
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 7, "n": 3})
        assert r.status_code == 200
        text = (await c.get("/metrics")).text
    assert f'vllm:request_params_n_sum{{model_name="{MODEL}"}} 3.0' in text
    assert f'vllm:request_params_n_count{{model_name="{MODEL}"}} 1.0' in text
    assert f'vllm:request_params_max_tokens_bucket{{le="10.0",model_name="{MODEL}"}} 1.0' in text
