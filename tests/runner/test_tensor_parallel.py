"""Tensor parallelism end to end: an engine over 2 gloo ranks (rank 0 here, one worker
process) returns exactly the greedy tokens of the single-rank engine, for every family, over
one batch mixing text-only and image requests, with chunked prefill and decode."""

from __future__ import annotations

import pytest

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.models.registry import make_tiny_model
from vlmserve.runner.tensor_parallel import TPRunner
from tests.utils import image, make_llm, user

FAMILIES = {
    "qwen2_vl": ("qwen2_vl", {}),
    "pixtral": ("pixtral", {"format": "hf"}),
    "mllama": ("mllama", {}),
}


def _workload(llm):
    chats = [
        ([user("What is the capital of France? Answer briefly.")], []),
        ([user(image(64, 48, 1), "Describe this picture")], [image(64, 48, 1)]),
        ([user("first", image(40, 72, 2)), {"role": "assistant", "content": "ok"}, user("and more?")],
         [image(40, 72, 2)]),
        ([user("Count: one two three four five six seven")], []),
    ]
    prompts = [llm.render_chat(c, imgs) for c, imgs in chats]
    params = [SamplingParams(temperature=0.0, max_tokens=6 + i, ignore_eos=True) for i in range(len(prompts))]
    return prompts, params


@pytest.mark.parametrize("family_id", list(FAMILIES))
def test_two_gloo_ranks_return_the_tokens_of_one(family_id, tmp_path):
    family, kwargs = FAMILIES[family_id]
    ckpt = make_tiny_model(family, tmp_path / family_id, seed=0, **kwargs)
    # A small token budget: prompts are prefilled in several chunks, mixed with decodes.
    common = dict(num_cross_kv_blocks=1024, max_num_batched_tokens=48, device="cpu")
    single = make_llm(ckpt, **common)
    prompts, params = _workload(single)
    expected = [c.token_ids for c in single.generate(prompts, params)]
    assert len({tuple(t) for t in expected}) > 1, "a degenerate model proves nothing"

    parallel = make_llm(ckpt, tensor_parallel_size=2, **common)
    try:
        assert isinstance(parallel.runner, TPRunner)
        spec, full = parallel.runner.model.kv_cache_spec, single.runner.model.kv_cache_spec
        assert spec.num_kv_heads * 2 == full.num_kv_heads  # each rank holds half the KV heads
        got = [c.token_ids for c in parallel.generate(prompts, params)]
    finally:
        parallel.runner.workers.close()
    assert got == expected


@pytest.mark.parametrize("family_id", list(FAMILIES))
def test_a_size_that_does_not_divide_the_heads_is_refused_at_load(family_id, tmp_path):
    from vlmserve.models.layers.parallel import TPGroup
    from vlmserve.models.loader import load_model

    family, kwargs = FAMILIES[family_id]
    ckpt = make_tiny_model(family, tmp_path / family_id, seed=0, **kwargs)
    # Every tiny decoder has 4 attention heads; the refusal comes before any collective.
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 3 does not divide the number of attention heads"):
        load_model(ckpt, device="cpu", progress=False, tp=TPGroup(0, 3))
