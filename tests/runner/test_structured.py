"""Grammar-constrained decoding in the engine (offline LLM over the tiny Qwen2-VL checkpoint):
batching with free requests, chunked prefill, preemption by recompute, EOS and the grammar's
end, sampling, and the runtime's bitmask on a hand-built batch."""

from __future__ import annotations

import json
import re

import jsonschema
import torch

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.engine.structured_spec import StructuredSpec
from vlmserve.runner.input_batch import CachedRequestState
from tests.utils import image, make_llm, user

SCHEMA = {"type": "object", "properties": {
    "animal": {"enum": ["cat", "dog"]},
    "legs": {"type": "integer", "minimum": 0, "maximum": 8},
    "names": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
    "required": ["animal", "legs", "names"], "additionalProperties": False}
JSON = StructuredSpec("json", json.dumps(SCHEMA))
LONG = StructuredSpec("regex", "[a-z]{20,30}")


def _greedy(spec=None, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=kw.pop("max_tokens", 64), structured=spec, **kw)


def _prompts(llm, n: int):
    return [llm.render_chat([user(image(56 + 28 * (i % 3), 56, i), f"Question {i}: what is it?")],
                            [image(56 + 28 * (i % 3), 56, i)]) for i in range(n)]


def test_constrained_and_free_requests_in_one_batch_get_their_solo_tokens(tiny_ckpt):
    llm = make_llm(tiny_ckpt)
    p = _prompts(llm, 2)
    free = _greedy(max_tokens=12, ignore_eos=True)
    solo_free = llm.generate([p[0]], free)[0]
    solo_json = llm.generate([p[1]], _greedy(JSON))[0]
    both = llm.generate([p[0], p[1], p[1]], [free, _greedy(JSON), _greedy(LONG, max_tokens=40)])
    assert both[0].token_ids == solo_free.token_ids
    assert both[1].token_ids == solo_json.token_ids
    jsonschema.validate(json.loads(both[1].text), SCHEMA)
    assert both[1].finish_reason == "stop" and re.fullmatch("[a-z]{20,30}", both[2].text)
    # Without the grammar the model's free text is not this JSON.
    assert llm.generate([p[1]], _greedy(max_tokens=len(solo_json.token_ids)))[0].text != solo_json.text


def test_chunked_prefill_and_preemption_keep_constrained_outputs(tiny_ckpt):
    ref = make_llm(tiny_ckpt)
    prompts = _prompts(ref, 6)
    params = [_greedy(LONG if i % 2 else JSON, max_tokens=40) for i in range(6)]
    expected = [c.token_ids for c in ref.generate(prompts, params)]

    chunked = make_llm(tiny_ckpt, max_num_batched_tokens=32)
    assert [c.token_ids for c in chunked.generate(prompts, params)] == expected

    need = max(len(p.prompt_token_ids) + 40 for p in prompts) // 16 + 1
    tight = make_llm(tiny_ckpt, num_kv_blocks=need * 2, enable_prefix_caching=False)
    got = tight.generate(prompts, params)
    assert tight.scheduler.get_stats().num_preemptions > 0  # matchers rebuilt from the tokens so far
    assert [c.token_ids for c in got] == expected
    for c, p in zip(got, params):
        if p.structured is JSON:
            jsonschema.validate(json.loads(c.text), SCHEMA)


def test_the_request_ends_when_the_grammar_does(tiny_ckpt):
    llm = make_llm(tiny_ckpt)
    p = _prompts(llm, 1)[0]
    choice = StructuredSpec("grammar", 'root ::= "yes" | "no" | "maybe so"')
    out = llm.generate([p], _greedy(choice))[0]
    # EOS is allowed only once the grammar is complete, and then it is all that is allowed.
    assert out.text in ("yes", "no", "maybe so") and out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.runner.sampler.eos_token_ids
    # ignore_eos: the scheduler would not stop on EOS, the grammar's end stops it.
    again = llm.generate([p], _greedy(choice, ignore_eos=True))[0]
    assert (again.text, again.token_ids, again.finish_reason) == (out.text, out.token_ids, "stop")


def test_sampled_rows_follow_the_grammar_with_the_samplers_parameters(tiny_ckpt):
    llm = make_llm(tiny_ckpt)
    p = _prompts(llm, 1)[0]
    spec = StructuredSpec("regex", "[0-9]{3}-[a-z]{2,4}")
    params = [SamplingParams(temperature=1.5, top_k=-1, top_p=0.95, seed=s, max_tokens=24, structured=spec,
                             repetition_penalty=1.2, presence_penalty=0.5) for s in range(4)]
    outs = llm.generate([p] * 4, params)
    assert all(re.fullmatch("[0-9]{3}-[a-z]{2,4}", o.text) for o in outs), [o.text for o in outs]
    assert len({o.text for o in outs}) > 1  # really sampled
    # Seeded: the same tokens again, alone.
    assert llm.generate([p], params[2])[0].token_ids == outs[2].token_ids


def _state(req_id: str, spec: StructuredSpec | None) -> CachedRequestState:
    return CachedRequestState(req_id=req_id, token_ids=[1, 2, 3], num_prompt_tokens=3, mm_items=[],
                              sampling_params=SamplingParams(structured=spec), block_ids=[], num_computed_tokens=3)


def test_bitmask_masks_constrained_rows_only_and_free_batches_compile_nothing(tiny_ckpt):
    llm = make_llm(tiny_ckpt)
    runtime = llm.runner.grammar
    logits = torch.randn(3, 832)
    free = [_state("a", None), _state("b", None)]
    before = logits.clone()
    runtime.apply(logits[:2], free)
    assert torch.equal(logits, before) and runtime._compiler is None  # free rows pay nothing

    states = [_state("a", None), _state("c", StructuredSpec("regex", "ab")), _state("d", None)]
    runtime.apply(logits, states)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    tokenizer = llm.processor.tokenizer
    assert allowed and all("ab".startswith(tokenizer.decode([t])) and tokenizer.decode([t]) for t in allowed)


def test_a_grammar_that_does_not_compile_fails_only_its_request(tiny_ckpt):
    llm = make_llm(tiny_ckpt)
    p = _prompts(llm, 1)[0]
    # The API refuses this with a 400; an engine that gets it anyway fails the one request.
    broken, ok = llm.generate([p, p], [_greedy(StructuredSpec("grammar", "root ::= undefined_rule")), _greedy(JSON)])
    assert broken.finish_reason == "error"
    assert ok.finish_reason == "stop" and jsonschema.validate(json.loads(ok.text), SCHEMA) is None
    # Matchers live exactly as long as the runner's request state (dropped with it).
    assert set(llm.runner.grammar._matchers) == set(llm.runner.requests)
