"""The engine end to end on tiny Qwen2-VL checkpoints: parity with transformers, batching
invariance, chunked prefill, preemption and prefix caching with images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmserve.models.qwen2_vl.processor import qwen2_vl_pixel_values
from vlmserve.engine.sampling_params import SamplingParams
from tests.utils import image, make_llm, user

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)
# Last-position logprobs of the prompt, ours vs transformers (float32, same weights).
LOGPROB_ATOL = 1e-4


def conversation(name: str):
    """(conversation, images) for the parity cases."""
    a, b = image(224, 224, 1), image(300, 200, 2)
    cases = {
        "one_image": ([user(a, "What is in this picture?")], [a]),
        "two_images_interleaved": ([user("Compare", a, "with", b, "please.")], [a, b]),
        "text_only": ([user("Tell me a story about a cat.")], []),
        "odd_size_image": ([user(image(333, 517, 3), "Describe it.")], [image(333, 517, 3)]),
        "tiny_image_upscaled": ([user(image(20, 20, 4), "What colour?")], [image(20, 20, 4)]),
        "multi_turn": (
            [
                user(a, "What is this?"),
                {"role": "assistant", "content": "A small red house."},
                user("And this one?", b),
            ],
            [a, b],
        ),
        "system_message": (
            [{"role": "system", "content": "You answer briefly."}, user(b, "Where is it?")],
            [b],
        ),
    }
    return cases[name]


PARITY_CASES = ["one_image", "two_images_interleaved", "text_only", "odd_size_image", "tiny_image_upscaled", "multi_turn", "system_message"]


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def engines(request, tiny_ckpt_factory):
    from transformers import Qwen2VLForConditionalGeneration

    ckpt = tiny_ckpt_factory(request.param)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    return make_llm(ckpt), hf


def hf_inputs(prompt):
    ids = torch.tensor([prompt.prompt_token_ids])
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # transformers needs the token modality map (1 = image, 2 = video) to build M-RoPE positions.
    types = torch.zeros_like(ids)
    for modality, prefix, code in (("image", "", 1), ("video", "_videos", 2)):
        items = [it for it in prompt.mm_items if it.modality == modality]
        if not items:
            continue
        kwargs["pixel_values" + prefix] = torch.cat([qwen2_vl_pixel_values(it) for it in items])
        kwargs[f"{modality}_grid_thw"] = torch.stack([torch.as_tensor(it.data["grid_thw"]) for it in items])
        for it in items:
            types[0, it.offset : it.offset + it.length] = code
    if prompt.mm_items:
        kwargs["mm_token_type_ids"] = types
    return kwargs


@torch.inference_mode()
def hf_greedy(hf, prompt, max_new_tokens, eos_ids):
    kwargs = hf_inputs(prompt)
    out = hf.generate(
        **kwargs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0,
        temperature=None, top_p=None, top_k=None, eos_token_id=sorted(eos_ids), pad_token_id=sorted(eos_ids)[0],
    )
    return out[0, kwargs["input_ids"].shape[1]:].tolist()


def clip(num_frames: int, w: int, h: int, seed: int):
    from vlmserve.multimodal.media import VideoFrames

    frames = np.stack([np.asarray(image(w, h, seed + i)) for i in range(num_frames)])
    return VideoFrames(frames, fps=2.0, timestamps=np.arange(num_frames) / 2.0, source_fps=25.0, duration=num_frames / 2)


def test_video_clip_greedy_tokens_match_transformers(engines):
    llm, hf = engines
    video = clip(4, 84, 56, 40)
    img = image(112, 84, 50)
    conv = [{"role": "user", "content": [
        {"type": "text", "text": "Watch"}, {"type": "video"}, {"type": "text", "text": "then look at"},
        {"type": "image"}, {"type": "text", "text": "What happens?"},
    ]}]
    prompt = llm.processor.render_chat(conv, [img], True, None, videos=[video])
    assert [it.modality for it in prompt.mm_items] == ["video", "image"]
    (ours,) = llm.generate([prompt], GREEDY)
    assert ours.token_ids == hf_greedy(hf, prompt, 12, llm.eos_token_ids)


@pytest.mark.parametrize("case", PARITY_CASES)
def test_greedy_tokens_and_logprobs_match_transformers(engines, case):
    llm, hf = engines
    conv, imgs = conversation(case)
    prompt = llm.render_chat(conv, imgs)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=5)
    (ours,) = llm.generate([prompt], params)
    theirs = hf_greedy(hf, prompt, 12, llm.eos_token_ids)
    assert ours.token_ids == theirs, f"{case}: ours {ours.token_ids} vs transformers {theirs}"

    with torch.inference_mode():
        ref = hf(**hf_inputs(prompt)).logits[0, -1].float().log_softmax(-1)
    first = llm_first_logprobs(llm, prompt)
    for token_id, lp in first.top:
        assert abs(lp - float(ref[token_id])) < LOGPROB_ATOL, (case, token_id, lp, float(ref[token_id]))
    assert [t for t, _ in first.top] == ref.topk(5).indices.tolist()


def llm_first_logprobs(llm, prompt):
    """The logprobs of the first sampled token (computed from the prompt's last position)."""
    from vlmserve.engine.request import Request

    req = Request("lp-probe", prompt, SamplingParams(temperature=0.0, max_tokens=1, logprobs=5), llm.eos_token_ids)
    llm.core.add_request(req)
    found = None
    while llm.core.has_unfinished_requests():
        for out in llm.core.step():
            if out.req_id == "lp-probe" and out.new_logprobs:
                found = out.new_logprobs[0]
    assert found is not None, "the engine returned no logprobs"
    return found


def _mixed_workload():
    prompts = []
    for i in range(32):
        kind = i % 4
        words = " ".join(["word"] * (1 + (i * 7) % 23))
        if kind == 0:
            prompts.append(([user(f"Question {i}: {words}?")], []))
        elif kind == 1:
            img = image(56 + 28 * (i % 5), 84 + 14 * (i % 3), 100 + i)
            prompts.append(([user(img, f"Describe {words}")], [img]))
        elif kind == 2:
            a, b = image(112, 56, 200 + i), image(28 * (2 + i % 4), 140, 300 + i)
            prompts.append(([user(a, words, b, "compare")], [a, b]))
        else:
            img = image(200 + i, 150, 400 + i)
            prompts.append(([user("first", img), {"role": "assistant", "content": words}, user("more?")], [img]))
    return prompts


def test_32_concurrent_requests_return_what_each_returns_alone(tiny_ckpt):
    llm = make_llm(tiny_ckpt, max_num_seqs=64, max_num_batched_tokens=4096)
    prompts = [llm.render_chat(c, i) for c, i in _mixed_workload()]
    params = [SamplingParams(temperature=0.0, max_tokens=4 + (i * 5) % 13) for i in range(len(prompts))]

    alone_passes = 0
    alone = []
    for p, sp in zip(prompts, params):
        before = llm.runner.num_forward_passes
        alone.append(llm.generate([p], sp)[0].token_ids)
        alone_passes += llm.runner.num_forward_passes - before

    before = llm.runner.num_forward_passes
    together = [c.token_ids for c in llm.generate(prompts, params)]
    together_passes = llm.runner.num_forward_passes - before
    assert together == alone
    # Sharing steps: one pass per step for the whole batch, not one per request.
    assert together_passes <= max(len(t) for t in alone) + 2
    assert together_passes * 8 < alone_passes


def test_chunked_prefill_with_a_chunk_boundary_inside_the_image_matches_one_shot(tiny_ckpt):
    img = image(224, 168, 7)  # 8x6 merged tokens = 48 placeholder tokens
    conv = [user("Look at this picture carefully:", img, "What do you see in it?")]
    big = make_llm(tiny_ckpt, max_num_batched_tokens=4096)
    prompt = big.render_chat(conv, [img])
    (item,) = prompt.mm_items
    budget = 16
    assert item.offset % budget != 0 and item.length > budget, "the chunks must cut through the image"
    assert len(prompt.prompt_token_ids) > budget
    expected = big.generate([prompt], GREEDY)[0].token_ids

    small = make_llm(tiny_ckpt, max_num_batched_tokens=budget)
    got = small.generate([prompt], GREEDY)[0]
    assert got.token_ids == expected
    assert small.runner.num_forward_passes >= len(prompt.prompt_token_ids) // budget
    assert small.runner.encoder.num_encoded_items == 1  # encoded once, used by several chunks


def test_preempted_requests_finish_with_the_same_output_and_free_every_block(tiny_ckpt):
    prompts_spec = _mixed_workload()[:12]
    ref = make_llm(tiny_ckpt)
    prompts = [ref.render_chat(c, i) for c, i in prompts_spec]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = [c.token_ids for c in ref.generate(prompts, params)]

    need = max(len(p.prompt_token_ids) + 24 for p in prompts) // 16 + 1
    tight = make_llm(tiny_ckpt, num_kv_blocks=need * 3, enable_prefix_caching=False)
    got = [c.token_ids for c in tight.generate(prompts, params)]
    assert got == expected
    stats = tight.scheduler.get_stats()
    assert stats.num_preemptions > 0
    kv = tight.scheduler.kv_cache
    assert kv.num_free_blocks == need * 3


def test_preempted_sampled_requests_with_penalties_resume_with_the_same_tokens(tiny_ckpt):
    """Seeded draws and penalty state survive preemption by recompute: the sampler rebuilds a
    re-admitted request's token counts from its token ids, and a seeded draw depends only on
    (seed, output position)."""
    prompts_spec = _mixed_workload()[:12]
    ref = make_llm(tiny_ckpt)
    prompts = [ref.render_chat(c, i) for c, i in prompts_spec]
    kinds = [
        dict(temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05),  # Qwen2-VL's published
        dict(temperature=0.9, top_p=0.9, repetition_penalty=1.3, presence_penalty=0.5, seed=3),
        dict(temperature=1.2, top_k=20, min_p=0.05, frequency_penalty=0.8, seed=4),
    ]
    params = [SamplingParams(max_tokens=24, ignore_eos=True, **{**kinds[i % 3], **({"seed": 100 + i} if "seed" in kinds[i % 3] else {})})
              for i in range(len(prompts))]
    expected = [c.token_ids for c in ref.generate(prompts, params)]

    need = max(len(p.prompt_token_ids) + 24 for p in prompts) // 16 + 1
    tight = make_llm(tiny_ckpt, num_kv_blocks=need * 3, enable_prefix_caching=False)
    got = [c.token_ids for c in tight.generate(prompts, params)]
    assert tight.scheduler.get_stats().num_preemptions > 0
    assert got == expected
    assert len({tuple(t) for t in got}) > 1


def test_repeated_image_question_hits_the_prefix_cache_and_another_image_does_not(tiny_ckpt):
    llm = make_llm(tiny_ckpt)
    a, b = image(224, 224, 11), image(224, 224, 12)
    question = "What is shown in this image? Answer in one sentence please."
    pa = llm.render_chat([user(a, question)], [a])
    pb = llm.render_chat([user(b, question)], [b])
    first = llm.generate([pa], GREEDY)[0]
    again = llm.generate([pa], GREEDY)[0]
    assert again.token_ids == first.token_ids
    assert again.num_cached_tokens >= (len(pa.prompt_token_ids) - 1) // 16 * 16 > 0
    other = llm.generate([pb], GREEDY)[0]
    (item,) = pb.mm_items
    # Only blocks entirely before the image may be shared.
    assert other.num_cached_tokens <= item.offset
    kv = llm.scheduler.kv_cache
    assert kv.prefix_cache_hits > 0
    # The image of the repeated request was not encoded twice.
    assert llm.runner.encoder.num_encoded_items == 2


def test_triton_backend_in_the_interpreter_serves_the_same_greedy_tokens_as_transformers(tiny_ckpt):
    """--kernel-backend triton: every kernel op runs as a Triton kernel (the interpreter on a
    CPU box), and the tokens still equal transformers'."""
    from transformers import Qwen2VLForConditionalGeneration

    from vlmserve import kernels

    llm = make_llm(tiny_ckpt, kernel_backend="triton")
    assert kernels.get_backend() == "triton"
    hf = Qwen2VLForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    img = image(112, 84, 60)
    prompt = llm.render_chat([user(img, "What is it?")], [img])
    params = SamplingParams(temperature=0.0, max_tokens=6)
    (ours,) = llm.generate([prompt], params)
    assert ours.token_ids == hf_greedy(hf, prompt, 6, llm.eos_token_ids)
    used = {name for name, op in kernels._triton_ops.items() if op is not None}
    assert {"rms_norm", "silu_and_mul", "rotary", "varlen_attention", "paged_attention", "write_kv",
            "merge_embeddings"} <= used
