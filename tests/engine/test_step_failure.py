"""A step whose forward pass raises fails its culprit, not the engine: the step's other requests
and later ones are served with their normal outputs, and nothing the failed step half-wrote
(KV blocks under prefix-cache hashes, encoder outputs) is ever reused."""

from __future__ import annotations

import pytest
import torch

from vlmserve.engine.engine_core import MAX_CONSECUTIVE_STEP_FAILURES
from vlmserve.engine.sampling_params import SamplingParams
from tests.utils import image, make_llm, user

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture
def llm(tiny_ckpt):
    return make_llm(tiny_ckpt, num_kv_blocks=128)


def _prompts(llm):
    img = image(120, 90, seed=3)
    long_question = "Describe every part of this picture in detail, please, " * 3
    return llm.render_chat([user(img, long_question)], [img]), llm.render_chat([user("Just text, no image.")], [])


def _fail_steps_running(llm, victims: set[str], corrupt_kv: bool):
    """Patches the runner: a step that runs one of `victims` raises. With `corrupt_kv`, it
    first runs for real, then scribbles over every KV block the step wrote for the victims
    (what a real fault can leave half-written), so a prefix cache that reused those blocks
    would give other tokens."""
    runner, scheduler = llm.core.runner, llm.core.scheduler
    real_execute = runner.execute

    def written_blocks(out, req_id):
        end = scheduler.requests[req_id].num_computed_tokens  # advanced when scheduled
        start, bs = end - out.num_scheduled_tokens[req_id], scheduler.block_size
        return scheduler.kv_cache.get_block_ids(req_id)[start // bs : -(-end // bs)]

    def execute(out):
        hit = victims & set(out.num_scheduled_tokens)
        if not hit:
            return real_execute(out)
        if corrupt_kv:
            blocks = [b for r in hit for b in written_blocks(out, r)]
            real_execute(out)
            for k_cache, v_cache in runner.kv_caches:
                k_cache[blocks] = torch.randn_like(k_cache[blocks]) * 50
                v_cache[blocks] = torch.randn_like(v_cache[blocks]) * 50
        raise RuntimeError("simulated device fault")

    runner.execute = execute
    return lambda: setattr(runner, "execute", real_execute)


def test_failed_step_ends_its_requests_with_error_and_the_engine_goes_on(llm, tiny_ckpt):
    with_image, text_only = _prompts(llm)
    ref_image, ref_text = (c.token_ids for c in make_llm(tiny_ckpt).generate([with_image, text_only], GREEDY))

    restore = _fail_steps_running(llm, {"llm-0"}, corrupt_kv=True)  # the first request LLM makes
    (failed,) = llm.generate([with_image], GREEDY)
    restore()
    assert failed.finish_reason == "error" and failed.token_ids == []
    assert llm.core.num_failed_steps == 1
    assert llm.core.scheduler.kv_cache.num_free_blocks == llm.core.scheduler.kv_cache.num_blocks

    # The same image and prompt again: no prefix-cache hit on the scribbled blocks.
    again, other = llm.generate([with_image, text_only], GREEDY)
    assert again.num_cached_tokens == 0
    assert again.token_ids == ref_image
    assert other.token_ids == ref_text


def test_a_failing_step_fails_only_the_request_that_triggers_it(llm, tiny_ckpt):
    img_a, img_b = image(120, 90, seed=3), image(90, 120, seed=4)
    prompts = [
        llm.render_chat([user(img_a, "What is in this picture?")], [img_a]),
        llm.render_chat([user("Just text, no image.")], []),
        llm.render_chat([user(img_b, "Describe the colours.")], [img_b]),
        llm.render_chat([user("Count to five.")], []),
    ]
    reference = [c.token_ids for c in make_llm(tiny_ckpt).generate(prompts, GREEDY)]
    # Every step that runs llm-2 (the second image request) raises, after scribbling over its
    # KV blocks: the four run in one batch, so the culprit is found by retrying halves.
    restore = _fail_steps_running(llm, {"llm-2"}, corrupt_kv=True)
    results = llm.generate(prompts, GREEDY)
    restore()
    assert results[2].finish_reason == "error" and results[2].token_ids == []
    for i in (0, 1, 3):
        assert results[i].finish_reason == "length" and results[i].token_ids == reference[i]
    assert 2 <= llm.core.num_failed_steps <= 3  # 4 -> 2 -> 1
    scheduler = llm.core.scheduler
    assert scheduler.kv_cache.num_free_blocks == scheduler.kv_cache.num_blocks
    assert not scheduler.culprits.active


def test_a_step_that_fails_while_encoding_forgets_the_encoder_output(llm):
    with_image, _ = _prompts(llm)
    encoder = llm.core.runner.encoder
    real_encode = encoder.encode

    def encode(items):
        raise RuntimeError("simulated fault in the vision tower")

    encoder.encode = encode
    (failed,) = llm.generate([with_image], GREEDY)
    encoder.encode = real_encode
    assert failed.finish_reason == "error"
    # The encoder cache must not claim an output that was never written.
    (ok,) = llm.generate([with_image], GREEDY)
    assert ok.finish_reason == "length" and len(ok.token_ids) == 10


def test_failing_steps_in_a_row_mean_the_engine_is_broken(llm):
    with_image, text_only = _prompts(llm)
    victims = {f"llm-{i}" for i in range(MAX_CONSECUTIVE_STEP_FAILURES)}
    _fail_steps_running(llm, victims, corrupt_kv=False)
    with pytest.raises(RuntimeError, match="simulated device fault"):
        # One request per step: each step fails, the last failure in a row propagates.
        for i in range(MAX_CONSECUTIVE_STEP_FAILURES):
            (c,) = llm.generate([text_only], GREEDY)
            assert c.finish_reason == "error"
