"""`vlmserve serve --model <the golden NVLM-D checkpoint>` on loopback, through the official
client: for each golden case, the served text is the official chat()'s response and the
prompt token count is the official one, streaming and not."""

from __future__ import annotations

import base64
import json

from tests.models.nvlm_d.conftest import CASES, golden_summary
from tests.utils import launch_server


def test_served_text_and_prompt_length_equal_the_golden_chat(golden, tmp_path):
    from openai import OpenAI

    conversations = {c["name"]: c for c in json.loads((golden / "inputs" / "conversations.json").read_text())["cases"]}
    with launch_server(golden / "checkpoint", tmp_path) as base:
        client = OpenAI(base_url=base + "/v1", api_key="unused")
        for case in CASES:
            entry, summary = conversations[case], golden_summary(case)
            png = (golden / "inputs" / entry["image"]).read_bytes()
            url = "data:image/png;base64," + base64.b64encode(png).decode()
            question = entry["question"].removeprefix("<image>\n")
            messages = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]
            max_tokens = len(summary["chat_generated_ids"])
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0)
            assert r.choices[0].message.content == summary["chat_response"]
            assert r.usage.prompt_tokens == summary["input_ids_len"]
            assert r.usage.completion_tokens == max_tokens
            stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                    temperature=0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == summary["chat_response"]
