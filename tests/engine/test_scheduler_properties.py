"""Property-based test of the scheduler and its cache managers (torch-free, hand-built runner).

Random workloads — prompts with 0-4 images (shared between requests and new), shared text
prefixes, random KV / encoder / cross-K/V pool sizes and budgets (so chunked prefill and
preemption happen), aborts at random points, random failed steps and a request that makes
every step it is in fail — are driven through `EngineCore` step by step. After every step:

- `schedule()` did not raise (nothing but the engine-is-broken limit may escape a step);
- no reference count is negative and the pools' books balance (KV blocks, encoder rows,
  cross K/V blocks);
- every encoder output a scheduled chunk needs is held by the runner or encoded in the step
  (`FakeRunner` checks it, with the rest of the runner protocol);
- a step with unfinished requests made progress (scheduled tokens or preempted), and every
  admitted request finishes within a bounded number of steps (no starvation, no livelock).

At the end every KV, encoder and cross block is free, and every request that neither failed
nor was aborted produced exactly the tokens it would have produced alone.

CI runs a fixed example budget; `VLMSERVE_SOAK_EXAMPLES=5000` asks for a soak run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmserve.config import EngineConfig
from vlmserve.engine.engine_core import EngineCore
from vlmserve.engine.request import Request
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.engine.scheduler import Scheduler
from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt
from tests.engine.fake_runner import FakeRunner, token_at

EXAMPLES = int(os.environ.get("VLMSERVE_SOAK_EXAMPLES", "100"))
IMG = 9
PREFIXES = [[300 + i for i in range(n)] for n in (0, 5, 11)]  # shared text prefixes


@dataclass
class Spec:
    req_id: str
    tokens: list[int]
    images: list[tuple[str, int, int]]  # (content hash, offset, placeholder length)
    max_tokens: int
    arrival: int  # step at which it is added
    abort_at: int | None  # step at which it is aborted, if still running


@st.composite
def workloads(draw):
    cross = draw(st.booleans())  # Mllama-like: items are 1 token, rows go to the cross K/V pool
    pool = {f"img{i}": draw(st.integers(1, 12)) for i in range(draw(st.integers(1, 4)))}
    cfg = dict(
        block_size=draw(st.sampled_from([2, 4, 8])),
        max_num_batched_tokens=draw(st.integers(3, 48)),
        max_num_seqs=draw(st.integers(1, 6)),
        encoder_cache_size=draw(st.integers(4, 28)),
        max_encoder_tokens_per_step=draw(st.integers(4, 40)),
        enable_prefix_caching=draw(st.booleans()),
    )
    num_kv_blocks = draw(st.integers(3, 40))
    num_cross_blocks = draw(st.integers(2, 16)) if cross else 0
    specs = []
    for r in range(draw(st.integers(1, 10))):
        tokens = list(draw(st.sampled_from(PREFIXES)))
        images = []
        for content_hash in draw(st.lists(st.sampled_from(sorted(pool)), max_size=4)):
            tokens += [1000 * (r + 1) + len(tokens) + i for i in range(draw(st.integers(0, 4)))]
            length = 1 if cross else pool[content_hash]
            images.append((content_hash, len(tokens), length))
            tokens += [IMG] * length
        tokens += [1000 * (r + 1) + len(tokens) + i for i in range(draw(st.integers(1, 10)))]
        arrival = draw(st.integers(0, 12))
        abort_at = draw(st.one_of(st.none(), st.integers(arrival, arrival + 30)))
        specs.append(Spec(f"r{r}", tokens, images, draw(st.integers(1, 8)), arrival, abort_at))
    # Failed steps are even-numbered: never several in a row, which would mean a broken engine.
    fail_steps = draw(st.sets(st.integers(0, 40).map(lambda k: 2 * k), max_size=4))
    culprit = draw(st.one_of(st.none(), st.sampled_from([s.req_id for s in specs])))
    return cfg, num_kv_blocks, num_cross_blocks, pool, specs, fail_steps, culprit


def make_request(spec: Spec, pool: dict[str, int], cross: bool) -> Request:
    items = [
        MultiModalItem("image", h, off, length, data={}, is_embed=np.zeros(1, bool) if cross else None,
                       cross_attn_tokens=pool[h] if cross else 0)
        for h, off, length in spec.images
    ]
    prompt = ProcessedPrompt(prompt_token_ids=list(spec.tokens), mm_items=items)
    return Request(spec.req_id, prompt, SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True),
                   eos_token_ids=frozenset({2}))


def check_books(sched: Scheduler) -> None:
    """Reference counts and free lists agree with what the live requests hold."""
    pool = sched.kv_cache.pool
    holders = [0] * pool.num_blocks
    for req_id, blocks in sched.kv_cache._req_blocks.items():
        assert req_id in sched.requests, f"{req_id} finished but holds KV blocks"
        for b in blocks:
            holders[b] += 1
    for block in pool.blocks:
        assert block.ref_cnt == holders[block.block_id] >= 0, block
        assert (block.block_id in pool._free) == (block.ref_cnt == 0), block
    enc = sched.encoder_cache
    assert 0 <= enc._num_used_rows <= enc.cache_size
    assert enc._num_used_rows == sum(enc._rows.values())
    assert enc._num_unreferenced_rows == sum(enc._rows[h] for h in enc._unreferenced)
    for content_hash, refs in enc._refs.items():
        assert bool(refs) != (content_hash in enc._unreferenced), content_hash
        assert refs <= set(sched.requests), f"{content_hash} referenced by finished requests {refs}"
    if sched.cross_kv is not None:
        held = sum(len(b) for b in sched.cross_kv._req_blocks.values())
        assert sched.cross_kv.num_free_blocks + held == sched.cross_kv.num_blocks
        assert set(sched.cross_kv._req_blocks) <= set(sched.requests)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_any_workload_is_served_without_raising_leaking_or_starving(workload):
    cfg, num_kv_blocks, num_cross_blocks, pool, specs, fail_steps, culprit = workload
    cross = num_cross_blocks > 0
    sched = Scheduler(EngineConfig(**cfg), num_kv_blocks=num_kv_blocks, max_model_len=512,
                      num_cross_kv_blocks=num_cross_blocks)
    step = 0

    def fail_if(out):
        return bool(out.num_scheduled_tokens) and (step in fail_steps or culprit in out.num_scheduled_tokens)

    runner = FakeRunner(sched, fail_if)
    core = EngineCore(sched, runner)
    admitted: dict[str, Spec] = {}
    results: dict[str, tuple[list[int], str | None]] = {}
    aborted: set[str] = set()
    total_tokens = sum(len(s.tokens) + s.max_tokens for s in specs)
    max_steps = 13 + 40 * total_tokens  # generous: a livelock runs into it
    logging.getLogger("vlmserve.engine.engine_core").disabled = True
    try:
        for step in range(max_steps):
            inputs = False
            for spec in specs:
                if spec.arrival == step:
                    inputs = True
                    try:
                        core.add_request(make_request(spec, pool, cross))
                        admitted[spec.req_id] = spec
                    except ValueError as e:  # refused: it names the flag that would admit it
                        assert "--" in str(e), str(e)
                if spec.abort_at == step and spec.req_id in sched.requests:
                    inputs = True
                    core.abort_requests([spec.req_id])
                    aborted.add(spec.req_id)
            if not core.has_unfinished_requests():
                if step > max(s.arrival for s in specs):
                    break
                continue
            for out in core.step():
                tokens, _ = results.get(out.req_id, ([], None))
                results[out.req_id] = (tokens + out.new_token_ids, out.finish_reason)
            assert core.last_step_progressed or inputs, f"step {step} did nothing: {sched.running} {sched.waiting}"
            check_books(sched)
            assert runner.violations == [], runner.violations
        else:
            raise AssertionError(f"not finished after {max_steps} steps: {sched.running} {sched.waiting}")
    finally:
        logging.getLogger("vlmserve.engine.engine_core").disabled = False

    assert not sched.requests and not sched.culprits.active
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks
    assert sched.encoder_cache.num_freeable_rows == sched.encoder_cache.cache_size
    if sched.cross_kv is not None:
        assert sched.cross_kv.num_free_blocks == sched.cross_kv.num_blocks
    for req_id, spec in admitted.items():
        tokens, reason = results.get(req_id, ([], None))
        if reason == "error":
            assert fail_steps or req_id == culprit, f"{req_id} failed with no fault injected"
            continue
        # Recomputed after preemption or a retry, a request still samples what it would alone.
        # Stopped by length at max_tokens, or when the next token would not fit the KV pool.
        n = min(spec.max_tokens, num_kv_blocks * cfg["block_size"] + 1 - len(spec.tokens))
        expected = [token_at(req_id, len(spec.tokens) + i) for i in range(n)]
        if reason is None:  # aborted before it finished: what it streamed so far is right
            assert req_id in aborted and tokens == expected[: len(tokens)], req_id
            continue
        assert reason == "length" and tokens == expected, (req_id, reason, tokens, expected)
    if not fail_steps and culprit in admitted and culprit not in aborted:
        assert results[culprit][1] == "error"
