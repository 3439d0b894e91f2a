"""`vlmserve serve` for every family on loopback: a chat with an image through the official
client returns what the offline engine returns (greedy), streaming and not."""

from __future__ import annotations

import pytest

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.models.registry import make_tiny_model
from tests.utils import image, launch_server, make_llm, png_data_url, user

FAMILIES = {
    "pixtral_hf": ("pixtral", {"format": "hf"}),
    "pixtral_mistral": ("pixtral", {"format": "mistral"}),
    "mllama": ("mllama", {}),
    "nvlm_d": ("nvlm_d", {"image_size": 112, "max_dynamic_patch": 4}),
    "molmo": ("molmo", {}),
}


@pytest.mark.parametrize("engine_mode", ["process", "thread"])
@pytest.mark.parametrize("family_id", list(FAMILIES))
def test_served_family_answers_like_the_offline_engine(family_id, engine_mode, tmp_path_factory):
    from openai import OpenAI

    family, kwargs = FAMILIES[family_id]
    ckpt = make_tiny_model(family, tmp_path_factory.mktemp(family_id), seed=1, **kwargs)
    img = image(80, 56, 5)
    question = "What is in this image?"
    llm = make_llm(ckpt, num_cross_kv_blocks=1024)
    prompt = llm.render_chat([user(img, question)], [img])
    expected = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]

    with launch_server(ckpt, tmp_path_factory.mktemp(f"{family_id}_server"), "--num-cross-kv-blocks", "1024",
                       "--engine-mode", engine_mode) as base:
        client = OpenAI(base_url=base + "/v1", api_key="unused")
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_data_url(img)}}, {"type": "text", "text": question}]}]
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.usage.prompt_tokens == len(prompt.prompt_token_ids)
        assert r.usage.completion_tokens == 8
        assert r.choices[0].message.content == expected.text
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected.text

        # These families take no video: a clear 400 before anything is decoded.
        import openai

        video = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                                              {"type": "text", "text": question}]}]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=video, max_tokens=4)
        assert e.value.body["code"] == "unsupported_modality" and "does not take video" in e.value.body["message"]
