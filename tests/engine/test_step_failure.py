"""A step whose forward pass raises fails the requests it ran, not the engine: later requests
are served, and nothing the failed step half-wrote (KV blocks under prefix-cache hashes,
encoder outputs) is ever reused."""

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
    first runs for real, then scribbles over every KV block the victims hold, so a prefix
    cache that reused those blocks would give other tokens."""
    runner, kv = llm.core.runner, llm.core.scheduler.kv_cache
    real_execute = runner.execute

    def execute(out):
        hit = victims & set(out.num_scheduled_tokens)
        if not hit:
            return real_execute(out)
        if corrupt_kv:
            real_execute(out)
            blocks = [b for r in hit for b in kv.get_block_ids(r)]
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
