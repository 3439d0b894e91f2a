"""The engine behaviours of the first family, for every family: batching invariance,
chunked prefill, preemption and prefix caching with images, through the one scheduler and
runner (no family-specific code in either)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.models.registry import make_tiny_model
from tests.utils import image, make_llm, user

# family id -> (registry family, extra maker kwargs)
FAMILIES = {
    "qwen2_vl": ("qwen2_vl", {}),
    "pixtral_hf": ("pixtral", {"format": "hf"}),
    "pixtral_mistral": ("pixtral", {"format": "mistral"}),
    "mllama": ("mllama", {}),
    "nvlm_d": ("nvlm_d", {"image_size": 112, "max_dynamic_patch": 4}),
    "molmo": ("molmo", {}),
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest.fixture(scope="module")
def make_ckpt(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(family_id: str) -> Path:
        if family_id not in cache:
            family, kwargs = FAMILIES[family_id]
            cache[family_id] = make_tiny_model(family, tmp_path_factory.mktemp(family_id), seed=0, **kwargs)
        return cache[family_id]

    return make


@pytest.fixture(scope="module", params=list(FAMILIES))
def ckpt(request, make_ckpt) -> Path:
    return make_ckpt(request.param)


def llm_for(ckpt: Path, **overrides):
    overrides.setdefault("num_cross_kv_blocks", 4096)
    return make_llm(ckpt, **overrides)


def workload(n: int):
    """Mixed chats: text only, one image, two images, multi-turn; various sizes."""
    out = []
    for i in range(n):
        words = " ".join(["word"] * (1 + (i * 5) % 11))
        kind = i % 4
        if kind == 0:
            out.append(([user(f"Question {i}: {words}?")], []))
        elif kind == 1:
            img = image(40 + 24 * (i % 4), 56 + 12 * (i % 3), 100 + i)
            out.append(([user(img, f"Describe {words}")], [img]))
        elif kind == 2:
            a, b = image(64, 40, 200 + i), image(30 + 10 * (i % 3), 70, 300 + i)
            out.append(([user(a, words, b, "compare")], [a, b]))
        else:
            img = image(90, 60, 400 + i)
            out.append(([user("first", img), {"role": "assistant", "content": words}, user("more?")], [img]))
    return out


def test_concurrent_requests_return_what_each_returns_alone(ckpt):
    llm = llm_for(ckpt)
    prompts = [llm.render_chat(c, i) for c, i in workload(12)]
    params = [SamplingParams(temperature=0.0, max_tokens=3 + i % 6) for i in range(len(prompts))]
    alone = [llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    before = llm.runner.num_forward_passes
    together = [c.token_ids for c in llm.generate(prompts, params)]
    assert together == alone
    assert llm.runner.num_forward_passes - before <= max(len(t) for t in alone) + 2
    assert len({tuple(t) for t in alone}) > 1, "a degenerate model proves nothing"


def test_chunked_prefill_matches_one_shot(ckpt):
    img = image(96, 72, 7)
    conv = [user("Look at this picture carefully:", img, "What do you see in it? Tell me.")]
    big = llm_for(ckpt)
    prompt = big.render_chat(conv, [img])
    expected = big.generate([prompt], GREEDY)[0].token_ids
    small = llm_for(ckpt, max_num_batched_tokens=5)
    assert small.generate([prompt], GREEDY)[0].token_ids == expected
    assert small.runner.num_forward_passes >= len(prompt.prompt_token_ids) // 5


def test_preemption_keeps_outputs_and_frees_every_block(ckpt):
    ref = llm_for(ckpt)
    prompts = [ref.render_chat(c, i) for c, i in workload(8)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = [c.token_ids for c in ref.generate(prompts, params)]
    # Room for two of the longest requests at a time, in small blocks: decodes outgrow it.
    need = max(len(p.prompt_token_ids) + 24 for p in prompts) // 4 + 1
    tight = llm_for(ckpt, block_size=4, num_kv_blocks=need * 2, enable_prefix_caching=False)
    assert [c.token_ids for c in tight.generate(prompts, params)] == expected
    assert tight.scheduler.get_stats().num_preemptions > 0
    assert tight.scheduler.kv_cache.num_free_blocks == need * 2
    if tight.scheduler.cross_kv is not None:
        assert tight.scheduler.cross_kv.num_free_blocks == tight.scheduler.cross_kv.num_blocks


def test_prefix_cache_hits_for_the_same_image_and_never_for_another(ckpt):
    llm = llm_for(ckpt, block_size=4)
    a, b = image(64, 64, 11), image(64, 64, 12)
    question = "What is shown in this image? Answer in one sentence please, with detail."
    pa = llm.render_chat([user(a, question)], [a])
    pb = llm.render_chat([user(b, question)], [b])
    first = llm.generate([pa], GREEDY)[0]
    again = llm.generate([pa], GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens >= (len(pa.prompt_token_ids) - 1) // 4 * 4 - 4 > 0
    other = llm.generate([pb], GREEDY)[0]
    (item,) = pb.mm_items
    limit = 0 if item.cross_attn_tokens else item.offset  # cross-attention: every token sees the image
    assert other.num_cached_tokens <= limit


def _hf_reference(family_id: str, ckpt: Path):
    """(transformers model, inputs builder) for the engine-level greedy parity. Qwen2-VL's is in
    test_llm_engine.py; Pixtral's Mistral format has no transformers model (its own tests
    check it gives the HF format's logits)."""
    import torch

    if family_id == "pixtral_hf":
        from transformers import LlavaForConditionalGeneration

        from tests.models.pixtral.test_model_parity import hf_inputs as pixtral_inputs

        model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
        return model, lambda llm, prompt: pixtral_inputs(prompt)
    if family_id == "mllama":
        from transformers import MllamaForConditionalGeneration

        from tests.models.mllama.test_model_parity import hf_inputs as mllama_inputs

        model = MllamaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
        return model, lambda llm, prompt: mllama_inputs(llm.processor, prompt)
    raise ValueError(family_id)


@pytest.mark.parametrize("family_id", ["pixtral_hf", "mllama"])
@pytest.mark.parametrize("case", ["one_image", "two_images", "text_only", "multi_turn"])
def test_engine_greedy_tokens_equal_transformers_generate(make_ckpt, family_id, case):
    import torch

    ckpt = make_ckpt(family_id)
    hf, hf_inputs = _hf_reference(family_id, ckpt)
    a, b = image(72, 48, 21), image(40, 90, 22)
    chats = {
        "one_image": ([user(a, "Describe this picture.")], [a]),
        "two_images": ([user("Compare", a, "with", b, "please.")], [a, b]),
        "text_only": ([user("Tell me a story about a cat.")], []),
        "multi_turn": ([user(a, "What is it?"), {"role": "assistant", "content": "A red house."},
                        user("And this?", b)], [a, b]),
    }
    conv, imgs = chats[case]
    llm = llm_for(ckpt)
    prompt = llm.render_chat(conv, imgs)
    ours = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0].token_ids
    with torch.inference_mode():
        expected = hf.generate(**hf_inputs(llm, prompt), max_new_tokens=8, do_sample=False, eos_token_id=None,
                               pad_token_id=0, repetition_penalty=1.0, temperature=None, top_p=None, top_k=None)
    assert ours == expected[0, len(prompt.prompt_token_ids):].tolist()
