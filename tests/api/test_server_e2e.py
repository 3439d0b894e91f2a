"""The real server (`vlmserve serve`) on loopback, driven by the official openai client."""

from __future__ import annotations


import httpx
import pytest

from tests.utils import image, launch_server, png_data_url


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    with launch_server(tiny_ckpt, tmp_path_factory.mktemp("server")) as base:
        yield base


def _messages(img):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(img)}},
        {"type": "text", "text": "What is in this image?"},
    ]}]


def test_chat_with_an_image_streaming_and_not_agree_with_the_offline_engine(server, tiny_ckpt):
    from openai import OpenAI

    from server.engine.sampling_params import SamplingParams
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
