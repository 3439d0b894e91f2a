"""Clients that go away: the real server aborts their requests, frees their KV blocks and
keeps serving everyone else."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.utils import launch_server


@pytest.fixture(scope="module", params=["process", "thread"])
def base(request, tiny_ckpt, tmp_path_factory):
    with launch_server(tiny_ckpt, tmp_path_factory.mktemp("server"), "--engine-mode", request.param) as url:
        yield url


def _wait_idle(base: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        load = httpx.get(base + "/v1/load").json()
        if load["num_running"] == 0 and load["num_waiting"] == 0:
            return load
        assert time.monotonic() < deadline, f"requests still held after the clients left: {load}"
        time.sleep(0.05)


def test_clients_that_disconnect_mid_stream_are_aborted_and_others_finish(base):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1000, "stream": True, "ignore_eos": True, "temperature": 0}
    for _ in range(4):
        with httpx.Client(timeout=30) as c, c.stream("POST", base + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for i, _line in enumerate(r.iter_lines()):
                if i >= 3:
                    break  # leave after a few chunks: the connection closes here
    load = _wait_idle(base)
    assert load["kv_cache_usage"] == 0.0
    ok = httpx.post(base + "/v1/chat/completions", timeout=30, json={
        "model": "tiny", "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_non_streaming_client_timeout_aborts_its_request(base):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Go on forever."}],
            "max_tokens": 1500, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions", json=body, timeout=0.3)
    _wait_idle(base)
