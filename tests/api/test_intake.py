"""Admission from arrival (`vlmserve.api.intake`), in process: the app over the fake engine with
the real MediaLoader fetching from a loopback server that holds requests in the fetch stage."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from vlmserve.api.app import create_app
from vlmserve.config import ServerConfig
from vlmserve.multimodal.budget import GiB
from vlmserve.multimodal.media import MediaConfig, MediaLoader
from tests.api.helpers import MODEL, png_data_url
from tests.api.media_server import GatedMediaServer, noise_png


@pytest.fixture
def media_server():
    with GatedMediaServer(noise_png(16, seed=1)) as s:
        yield s


def _client(engine, **config) -> httpx.AsyncClient:
    loader = MediaLoader(MediaConfig(allow_private_networks=True, image_timeout_s=30, cache_bytes=0))
    app = create_app(engine, ServerConfig(**config), media=loader)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


def _chat(*urls: str, text: str = "what is this?") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": parts + [
        {"type": "text", "text": text}]}]}


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_requests_fetching_media_count_toward_max_pending_requests(engine, media_server):
    # Two requests sit in the media fetch: none has reached the engine yet, but both are in flight.
    async with _client(engine, max_pending_requests=2) as c:
        slow = [asyncio.create_task(c.post("/v1/chat/completions", json=_chat(media_server.url(f"/slow/{i}.png"))))
                for i in range(2)]
        await _until(lambda: media_server.count("/slow/") == 2)
        assert engine.request_ids == []
        r = await c.post("/v1/chat/completions", json=_chat(text="text only"))
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert "2 requests in flight" in r.json()["error"]["message"]
        assert "--max-pending-requests 2" in r.json()["error"]["message"]
        assert (await c.get("/v1/load")).json()["num_requests_in_flight"] == 2
        media_server.gate.set()
        assert [t.status_code for t in await asyncio.gather(*slow)] == [200, 200]
        assert (await c.post("/v1/chat/completions", json=_chat(text="text only"))).status_code == 200
        assert (await c.get("/v1/load")).json()["num_requests_in_flight"] == 0


async def test_past_the_media_budget_new_media_requests_get_503_before_any_fetch(engine, media_server):
    cap = 4096  # --max-media-bytes: what a URL reserves at arrival
    image = len(media_server.image)
    # Room for two URLs' caps, not three; and for both requests' raw + decoded bytes at once.
    assert 2 * (image + 16 * 16 * 3) < 2.5 * cap
    limit_gb = 2.5 * cap / GiB
    loader = MediaLoader(MediaConfig(allow_private_networks=True, image_timeout_s=30, cache_bytes=0,
                                     max_media_bytes=cap))
    app = create_app(engine, ServerConfig(max_media_memory_gb=limit_gb), media=loader)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30) as c:
        slow = [asyncio.create_task(c.post("/v1/chat/completions", json=_chat(media_server.url(f"/slow/{i}.png"))))
                for i in range(2)]
        await _until(lambda: media_server.count("/slow/") == 2)
        load = (await c.get("/v1/load")).json()
        assert load["media_memory_bytes"] == 2 * cap and load["media_memory_limit_bytes"] == int(limit_gb * GiB)
        for i in range(3):
            r = await c.post("/v1/chat/completions", json=_chat(media_server.url(f"/refused/{i}.png")))
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert err["code"] == "media_memory_full" and err["type"] == "server_error"
            assert "--max-media-memory-gb" in err["message"]
        assert media_server.count("/refused/") == 0  # nothing was fetched for them
        # Text needs no media memory: it is still served.
        assert (await c.post("/v1/chat/completions", json=_chat(text="text only"))).status_code == 200
        metrics = (await c.get("/metrics")).text
        assert f'vlmserve:media_memory_bytes{{model_name="{MODEL}"}} {float(2 * cap)}' in metrics
        media_server.gate.set()
        assert [t.status_code for t in await asyncio.gather(*slow)] == [200, 200]
        assert (await c.get("/v1/load")).json()["media_memory_bytes"] == 0
        r = await c.post("/v1/chat/completions", json=_chat(media_server.url("/after.png")))
        assert r.status_code == 200, r.text
        assert (await c.get("/v1/load")).json()["media_memory_bytes"] == 0


async def test_media_larger_than_the_whole_budget_is_413_naming_the_flag(engine):
    url = png_data_url(size=(64, 64))
    async with _client(engine, max_media_memory_gb=100 / GiB) as c:
        r = await c.post("/v1/chat/completions", json=_chat(url))
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "media_memory_exceeded" and "--max-media-memory-gb" in err["message"]
        assert (await c.get("/v1/load")).json()["media_memory_bytes"] == 0


async def test_a_decode_past_the_budget_is_refused_from_the_header_and_releases(engine):
    # The PNG's bytes fit, its 300x300 pixels do not: refused from the header, before decoding.
    url = png_data_url(size=(300, 300))
    async with _client(engine, max_media_memory_gb=200_000 / GiB) as c:
        r = await c.post("/v1/chat/completions", json=_chat(url))
        assert r.status_code == 413, r.text
        assert not engine.chat_calls  # nothing was rendered
        assert (await c.get("/v1/load")).json()["media_memory_bytes"] == 0
        small = png_data_url(size=(64, 64))
        assert (await c.post("/v1/chat/completions", json=_chat(small))).status_code == 200
        assert (await c.get("/v1/load")).json()["media_memory_bytes"] == 0


async def test_a_request_held_in_the_engine_holds_only_its_data_url_text_and_pixels(engine):
    import numpy as np

    from vlmserve.api.intake import Intake
    from vlmserve.multimodal.budget import MediaBudget
    from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt

    url = png_data_url(size=(64, 48))
    engine.block_after_steps = 1
    async with _client(engine) as c:
        held = asyncio.create_task(c.post("/v1/chat/completions", json=_chat(url)))
        await engine.reached_block.wait()
        # Fetched and decoded bytes are gone once rendered; the body's data: URL text stays.
        assert (await c.get("/v1/load")).json()["media_memory_bytes"] == len(url)
        engine.release.set()
        assert (await held).status_code == 200
        assert (await c.get("/v1/load")).json()["media_memory_bytes"] == 0

    # Rendered pixels count once here and once per engine request in the core's own process.
    intake = Intake(8, MediaBudget(10**6), {"image": 1000}, separate_core_process=True)
    ticket = intake.admit(2, [("image", "http://example.com/a.png")])
    assert intake.budget.held == 1000 and intake.in_flight == 2
    pixels = np.zeros((10, 10, 3), dtype=np.uint8)
    prompt = ProcessedPrompt([1, 2], [MultiModalItem("image", "h", 0, 1, {"pixels": pixels, "grid": (1, 1)})])
    ticket.media_loaded()
    ticket.rendered(prompt)
    assert intake.budget.held == 300 * (1 + 2)
    with ticket:
        pass
    assert intake.budget.held == 0 and intake.in_flight == 0
