"""The real server (`vlmserve serve`) on loopback, driven by the official openai client."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.utils import image, launch_server, png_data_url, wait_process_exited


@pytest.fixture(scope="module", params=["process", "thread"])
def server(request, tiny_ckpt, tmp_path_factory):
    with launch_server(tiny_ckpt, tmp_path_factory.mktemp("server"), "--engine-mode", request.param) as base:
        yield base


def _messages(img):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(img)}},
        {"type": "text", "text": "What is in this image?"},
    ]}]


def test_chat_with_an_image_streaming_and_not_agree_with_the_offline_engine(server, tiny_ckpt):
    from openai import OpenAI

    from vlmserve.engine.sampling_params import SamplingParams
    from tests.utils import make_llm, user

    client = OpenAI(base_url=server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    img = image(200, 150, 21)

    r = client.chat.completions.create(model="tiny", messages=_messages(img), max_tokens=10, temperature=0)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 64

    chunks = list(client.chat.completions.create(
        model="tiny", messages=_messages(img), max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens

    llm = make_llm(tiny_ckpt)
    prompt = llm.render_chat([user(img, "What is in this image?")], [img])
    offline = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10))[0]
    assert offline.text == text
    assert r.usage.prompt_tokens == len(prompt.prompt_token_ids)


def test_bad_image_gets_a_400_and_the_server_keeps_serving(server):
    bad = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
        {"type": "text", "text": "hi"},
    ]}]
    r = httpx.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": bad}, timeout=30)
    assert r.status_code == 400
    assert "message" in r.json()["error"]
    ok = httpx.post(server + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200


def test_video_url_chat_is_answered(server):
    from openai import OpenAI

    from tests.multimodal.conftest import data_url, gray_clip

    client = OpenAI(base_url=server + "/v1", api_key="unused")
    video = data_url(gray_clip(n=8, rate=4, size=(64, 48)), "video/mp4")
    r = client.chat.completions.create(model="tiny", max_tokens=5, temperature=0, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video}},
        {"type": "text", "text": "What happens in this video?"},
    ]}])
    assert r.usage.completion_tokens > 0
    # 8 frames at 4 fps sampled at 2 fps → 4 frames → 2 temporal patches of at least 2x2 merged tokens
    assert r.usage.prompt_tokens > 2 * 4


def test_empty_video_gets_a_400(server):
    bad = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAAAAA"}},
        {"type": "text", "text": "hi"},
    ]}]
    r = httpx.post(server + "/v1/chat/completions", json={"model": "tiny", "messages": bad}, timeout=30)
    assert r.status_code == 400, r.text


# ---- the engine core's process (the default engine mode) ----------------------------------
def _engine_pid(workdir: Path) -> int:
    match = re.search(r"engine core: process, pid (\d+)", (workdir / "server.log").read_text())
    assert match, "the server did not log its engine process"
    return int(match.group(1))


def test_killed_engine_process_fails_the_stream_and_health_turns_503(tiny_ckpt, tmp_path):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 1000, "stream": True, "ignore_eos": True, "temperature": 0}
    with launch_server(tiny_ckpt, tmp_path) as base:
        engine_pid = _engine_pid(tmp_path)
        with httpx.Client(timeout=30) as c, c.stream("POST", base + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(engine_pid, signal.SIGKILL)
            t0 = time.monotonic()
            rest = [line for line in lines if line]  # must end (a hang is a ReadTimeout)
        assert time.monotonic() - t0 < 10
        assert rest[-1] == "data: [DONE]"
        assert "error" in json.loads(rest[-2].removeprefix("data: "))
        assert httpx.get(base + "/health").status_code == 503
        assert httpx.get(base + "/ready").status_code == 503
        # Once dead, a new request gets its 503 before any response starts, streamed or not.
        r = httpx.post(base + "/v1/chat/completions", timeout=10, json={**body, "stream": False})
        assert r.status_code == 503 and "not healthy" in r.json()["error"]["message"]
        with httpx.Client(timeout=10) as c, c.stream("POST", base + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")


def test_sigterm_stops_the_engine_process(tiny_ckpt, tmp_path):
    with launch_server(tiny_ckpt, tmp_path) as base:
        engine_pid = _engine_pid(tmp_path)
        ok = httpx.post(base + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200
    # launch_server sent SIGTERM and waited for the server to exit
    assert wait_process_exited(engine_pid, 5), "the engine process outlived the server"


def test_sigterm_with_drain_seconds_fails_readiness_but_keeps_serving_then_exits(tiny_ckpt, tmp_path):
    procs = []
    with launch_server(tiny_ckpt, tmp_path, "--drain-seconds", "4", procs=procs) as base:
        (proc,) = procs
        assert httpx.get(base + "/ready").status_code == 200
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        deadline = t0 + 3
        while httpx.get(base + "/ready").status_code != 503:
            assert time.monotonic() < deadline, "/ready still 200 after SIGTERM"
            time.sleep(0.05)
        # Draining: readiness fails, liveness holds, and requests are still served.
        assert httpx.get(base + "/health").status_code == 200
        r = httpx.post(base + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        assert time.monotonic() - t0 < 4, "the request took the whole drain window: nothing was proven"
        proc.wait(30)
        assert proc.returncode is not None and time.monotonic() - t0 >= 3.5
    log = (tmp_path / "server.log").read_text()
    assert "draining for 4.0 s" in log


def test_serve_exits_with_the_engine_processs_error_when_it_cannot_start(tiny_ckpt, tmp_path):
    args = [sys.executable, "-m", "vlmserve.cli", "serve", "--model", str(tiny_ckpt), "--port", "1",
            "--kv-cache-memory-gb", "1e-7"]
    env = dict(os.environ, VLMSERVE_CACHE=str(tmp_path))
    done = subprocess.run(args, capture_output=True, text=True, timeout=90, env=env)
    assert done.returncode != 0
    assert "holds only 0 KV blocks; raise it" in done.stderr.splitlines()[-1]


def test_an_image_the_engine_can_never_encode_gets_a_400_naming_the_limit(tiny_ckpt, tmp_path_factory):
    args = ("--max-encoder-tokens-per-step", "16", "--encoder-cache-size", "16")
    with launch_server(tiny_ckpt, tmp_path_factory.mktemp("small_encoder"), *args) as base:
        r = httpx.post(base + "/v1/chat/completions", timeout=30, json={"model": "tiny", "max_tokens": 2,
                       "messages": _messages(image(448, 448, 3))})
        assert r.status_code == 400, r.text
        assert "max_encoder_tokens_per_step=16" in r.json()["error"]["message"]
        ok = httpx.post(base + "/v1/chat/completions", timeout=30, json={"model": "tiny", "max_tokens": 2,
                        "messages": [{"role": "user", "content": "and text?"}]})
        assert ok.status_code == 200
