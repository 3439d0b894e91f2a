"""A bounded stress run of the real server on loopback: a few hundred concurrent requests mixing
images (shared and new), n > 1, clients that disconnect mid-stream, oversized inputs, and a KV
pool small enough that long generations preempt each other. Nothing but the documented refusals
(400 naming the limit and its flag) may fail, /health stays 200 throughout, and afterwards
/v1/load shows nothing running or waiting and the KV cache back to its idle usage."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest

from tests.utils import image, launch_server, png_data_url

NUM_REQUESTS = 240
CONCURRENCY = 24
# 40 blocks of 16 tokens: a handful of long generations overflow it and preempt each other.
ARGS = ("--engine-mode", "process", "--num-kv-blocks", "40", "--block-size", "16", "--max-model-len", "1024",
        "--max-num-seqs", "16", "--max-encoder-tokens-per-step", "40", "--encoder-cache-size", "48",
        "--max-image-pixels", "250000")
# 6..27 image tokens each: a few fill the 48-row encoder cache, so requests mixing new and
# recently seen images keep evicting (the pressure under which planning once over-promised rows).
IMAGES = [png_data_url(image(56 + 28 * i, 84, seed=i)) for i in range(8)]
TOO_MANY_ENCODER_ROWS = png_data_url(image(336, 336, seed=9))  # 144 image tokens > 40 per step
TOO_MANY_PIXELS = png_data_url(image(600, 500, seed=10))  # 300 000 px > --max-image-pixels


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    with launch_server(tiny_ckpt, tmp_path_factory.mktemp("server"), *ARGS) as base:
        yield base


def _chat(text: str, images=(), **kw) -> tuple[str, dict]:
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images] + [{"type": "text", "text": text}]
    return "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}


def _workload(rng: random.Random) -> list[tuple[str, tuple[str, dict], str]]:
    """(kind, (path, body), what to expect): ok | refused (a 400 naming the flag) | disconnect."""
    jobs = []
    for i in range(NUM_REQUESTS):
        kind = rng.choices(["text", "image", "n", "long", "disconnect", "oversized"], [5, 6, 2, 2, 2, 2])[0]
        sampling = {"temperature": rng.choice([0, 0.8]), "seed": i, "max_tokens": rng.randint(2, 12)}
        if kind == "text":
            jobs.append((kind, _chat(f"Question {i}: tell me something.", stream=rng.random() < 0.5, **sampling), "ok"))
        elif kind == "image":
            imgs = rng.sample(IMAGES, rng.randint(1, 3))  # the eight recur: encoder and prefix cache hits
            jobs.append((kind, _chat("What is in this picture?", imgs, stream=rng.random() < 0.5, **sampling), "ok"))
        elif kind == "n":
            jobs.append((kind, _chat("Give me a name.", rng.sample(IMAGES, 1), n=3, **sampling), "ok"))
        elif kind == "long":  # long generations: the KV pool cannot hold several of them
            jobs.append((kind, _chat(f"Story {i}", max_tokens=rng.randint(120, 200), ignore_eos=True,
                                     temperature=0, stream=True), "ok"))
        elif kind == "disconnect":
            jobs.append((kind, _chat("Tell me a long story.", rng.sample(IMAGES, 1), max_tokens=300,
                                     ignore_eos=True, stream=True), "disconnect"))
        else:
            jobs.append((kind, rng.choice([
                ("/v1/completions", {"model": "tiny", "prompt": [100] * 700, "max_tokens": 4}),  # > KV pool (640)
                ("/v1/completions", {"model": "tiny", "prompt": [100] * 1100, "max_tokens": 4}),  # > context
                _chat("What is this?", [TOO_MANY_ENCODER_ROWS], max_tokens=4),
                _chat("What is this?", [TOO_MANY_PIXELS], max_tokens=4),
            ]), "refused"))
    return jobs


async def _run(client: httpx.AsyncClient, kind: str, path: str, body: dict, expect: str) -> str | None:
    """Returns a description of what went wrong, or None."""
    if body.get("stream"):
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                return f"{kind}: stream answered {r.status_code}: {(await r.aread())[:300]!r}"
            events = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if expect == "disconnect" and events >= 3:
                    return None  # leaving closes the connection: the server must abort the request
                if line != "data: [DONE]" and "error" in json.loads(line[6:]):
                    return f"{kind}: error event {line[:300]}"
            return None if events else f"{kind}: empty stream"
    r = await client.post(path, json=body)
    if expect == "refused":
        err = r.json().get("error", {})
        if r.status_code != 400 or "--" not in err.get("message", ""):
            return f"{kind}: expected a 400 naming a flag, got {r.status_code} {r.text[:300]}"
        return None
    if r.status_code != 200:
        return f"{kind}: {r.status_code} {r.text[:300]}"
    choices = r.json()["choices"]
    if len(choices) != body.get("n", 1) or any(c["finish_reason"] not in ("stop", "length") for c in choices):
        return f"{kind}: bad choices {choices}"
    return None


async def test_a_few_hundred_hostile_requests_leave_the_server_healthy_and_idle(server):
    jobs = _workload(random.Random(0))
    health: list[int] = []
    done = asyncio.Event()

    async def watch_health(client: httpx.AsyncClient) -> None:
        while not done.is_set():
            health.append((await client.get("/health")).status_code)
            await asyncio.sleep(0.2)

    limits = httpx.Limits(max_connections=CONCURRENCY + 2)
    async with httpx.AsyncClient(base_url=server, timeout=120, limits=limits) as client:
        watcher = asyncio.create_task(watch_health(client))
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(job):
            async with gate:
                kind, (path, body), expect = job
                return await _run(client, kind, path, body, expect)

        t0 = time.monotonic()
        problems = [p for p in await asyncio.gather(*(one(j) for j in jobs)) if p]
        elapsed = time.monotonic() - t0
        done.set()
        await watcher
        print(f"{len(jobs)} requests in {elapsed:.1f} s")
        assert problems == [], problems[:10]
        assert health and set(health) == {200}, health

        deadline = time.monotonic() + 15
        while True:
            load = (await client.get("/v1/load")).json()
            if load["num_running"] == 0 and load["num_waiting"] == 0 and load["kv_cache_usage"] == 0.0:
                break
            assert time.monotonic() < deadline, f"not back to idle after the run: {load}"
            await asyncio.sleep(0.1)
        assert load["num_preemptions"] > 0, "the tiny KV pool never forced a preemption: the run tested less"
        assert load["encoder_cache_hits"] > 0
        path, body = _chat("Still there?", IMAGES[:1], max_tokens=3)
        r = await client.post(path, json=body)
        assert r.status_code == 200 and (await client.get("/health")).status_code == 200
