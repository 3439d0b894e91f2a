"""The media memory budget on the real server (`vlmserve serve`, engine core in its own process)
over loopback, with a loopback media server that holds requests in the fetch stage.

Sizes: a 128x128 noise PNG is ~49 KB; a URL reserves the byte cap (140 000) at arrival, so
the ~300 KB budget holds two fetching requests and refuses a third before it fetches."""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.api.media_server import GatedMediaServer, noise_png
from tests.utils import image, launch_server, png_data_url

CAP = 140_000
LIMIT_GB = 0.00028  # 300 647 bytes


@pytest.fixture(scope="module")
def media_server():
    with GatedMediaServer(noise_png(128, seed=3)) as s:
        yield s


@pytest.fixture(scope="module")
def base(tiny_ckpt, tmp_path_factory):
    args = ("--allow-private-media-urls", "--max-media-bytes", str(CAP), "--max-media-memory-gb", str(LIMIT_GB),
            "--image-timeout-s", "60")
    with launch_server(tiny_ckpt, tmp_path_factory.mktemp("server"), *args) as url:
        yield url


def _chat(url: str, **kw) -> dict:
    return {"model": "tiny", "max_tokens": 2, "temperature": 0, **kw, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]}


def _load(base: str) -> dict:
    return httpx.get(base + "/v1/load", timeout=10).json()


def _wait_load(base: str, timeout: float = 30.0, **want: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        load = _load(base)
        if all(load[k] == v for k, v in want.items()):
            return load
        assert time.monotonic() < deadline, f"/v1/load never reached {want}: {load}"
        time.sleep(0.05)


def _raw_post(base: str, path: str, body: dict) -> socket.socket:
    """A POST whose connection the test closes when it likes (a client that goes away)."""
    parts = urlsplit(base)
    data = json.dumps(body).encode()
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    sock.sendall(head.encode() + data)
    return sock


def _wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_media_budget_refuses_before_fetching_and_returns_to_zero(base, media_server):
    limit = _load(base)["media_memory_limit_bytes"]
    assert 2 * CAP <= limit < 3 * CAP
    # A: a client that waits for its answer; B: one that will leave while its image is fetched.
    result: dict = {}
    waiting = threading.Thread(target=lambda: result.update(
        a=httpx.post(base + "/v1/chat/completions", json=_chat(media_server.url("/slow/a.png")), timeout=120)))
    waiting.start()
    leaving = _raw_post(base, "/v1/chat/completions", _chat(media_server.url("/slow/b.png")))
    _wait_until(lambda: media_server.count("/slow/") == 2)
    load = _wait_load(base, media_memory_bytes=2 * CAP, num_requests_in_flight=2)
    assert load["media_memory_bytes"] <= limit

    for i in range(4):  # past the budget: 503 + Retry-After, and nothing fetched
        r = httpx.post(base + "/v1/chat/completions", json=_chat(media_server.url(f"/refused/{i}.png")), timeout=30)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["code"] == "media_memory_full" and f"--max-media-memory-gb {LIMIT_GB:g}" in err["message"]
    assert media_server.count("/refused/") == 0
    metrics = httpx.get(base + "/metrics", timeout=10).text
    assert f'vlmserve:media_memory_bytes{{model_name="tiny"}} {float(2 * CAP)}' in metrics

    leaving.close()  # B's client goes away mid-fetch: its share comes back at once
    _wait_load(base, media_memory_bytes=CAP, num_requests_in_flight=1)

    # A stream with an inline image whose client leaves mid-stream.
    with httpx.Client(timeout=60) as c, c.stream("POST", base + "/v1/chat/completions", json=_chat(
            png_data_url(image(96, 80, seed=5)), max_tokens=500, ignore_eos=True, stream=True)) as r:
        assert r.status_code == 200
        for i, _line in enumerate(r.iter_lines()):
            if i >= 2:
                break
    _wait_load(base, media_memory_bytes=CAP, num_requests_in_flight=1)

    media_server.gate.set()
    waiting.join(120)
    assert result["a"].status_code == 200, result["a"].text
    _wait_load(base, media_memory_bytes=0, num_requests_in_flight=0, num_running=0, num_waiting=0)
    assert httpx.get(base + "/health", timeout=10).status_code == 200


def test_a_media_heavy_burst_gets_answers_or_503s_and_leaves_nothing_held(base, media_server):
    media_server.gate.set()
    statuses: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        r = httpx.post(base + "/v1/chat/completions", json=_chat(media_server.url(f"/burst/{i}.png")), timeout=120)
        with lock:
            statuses.append((r.status_code, r.headers.get("retry-after")))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(statuses) == 10
    assert all(code == 200 or (code == 503 and retry == "1") for code, retry in statuses), statuses
    assert any(code == 200 for code, _ in statuses)
    _wait_load(base, media_memory_bytes=0, num_requests_in_flight=0, num_running=0, num_waiting=0)
    assert httpx.get(base + "/health", timeout=10).status_code == 200
