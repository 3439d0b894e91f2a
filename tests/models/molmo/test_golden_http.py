"""`vlmserve serve --model <golden checkpoint>` on loopback: each golden conversation, sent
through the official OpenAI client with its image as a data URL, is answered with the official
model's greedy text and counted with the official prompt length."""

from __future__ import annotations

import base64

import pytest

from tests.models.molmo.conftest import CHECKPOINT, cases, golden_dir, summary
from tests.utils import launch_server


def _data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_served_text_equals_the_official_greedy_decode(tmp_path):
    from openai import OpenAI

    golden = golden_dir()
    expected = summary()
    with launch_server(CHECKPOINT, tmp_path) as base:
        client = OpenAI(base_url=base + "/v1", api_key="unused")
        for case in cases():
            want = expected[case["name"]]
            messages = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _data_url(golden / "inputs" / case["image"])}},
                {"type": "text", "text": case["text"]}]}]
            steps = len(want["generated_ids"])
            # The official generation had no stop token and decoded special tokens too.
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=steps, temperature=0,
                                               extra_body={"ignore_eos": True, "skip_special_tokens": False})
            assert r.usage.prompt_tokens == want["input_ids_len"]
            assert r.usage.completion_tokens == steps
            assert r.choices[0].message.content == want["generated_text"]
            stream = client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=steps, temperature=0, stream=True,
                extra_body={"ignore_eos": True, "skip_special_tokens": False})
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want["generated_text"]

        # A system message has no place in Molmo's prompt format: a clear 400.
        import openai

        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", max_tokens=2, messages=[
                {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
        assert "system role" in e.value.body["message"]
