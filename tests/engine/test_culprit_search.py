"""A failing step fails only its culprit: the step's requests are retried in halves until the
one that fails runs alone; the others finish with the outputs they would have had. Driven with
a real Scheduler and EngineCore over a hand-built runner (no model)."""

from __future__ import annotations

import pytest

from vlmserve.config import EngineConfig
from vlmserve.engine.engine_core import MAX_CONSECUTIVE_STEP_FAILURES, EngineCore
from vlmserve.engine.scheduler import Scheduler
from tests.engine.fake_runner import FakeRunner
from tests.engine.test_scheduler import make_request


def _run(core: EngineCore, max_steps: int = 200) -> dict[str, tuple[list[int], str]]:
    results: dict[str, tuple[list[int], str | None]] = {}
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            return results
        for out in core.step():
            tokens, _ = results.get(out.req_id, ([], None))
            results[out.req_id] = (tokens + out.new_token_ids, out.finish_reason)
    raise AssertionError("requests did not finish")


def _engine(fail_if=None, **cfg) -> tuple[EngineCore, FakeRunner]:
    cfg.setdefault("block_size", 4)
    sched = Scheduler(EngineConfig(**cfg), num_kv_blocks=64, max_model_len=256)
    runner = FakeRunner(sched, fail_if)
    return EngineCore(sched, runner), runner


def _workload(core: EngineCore) -> None:
    for i in range(6):
        images = [(f"img{i % 2}", 2, 6)] if i % 3 == 0 else []
        core.add_request(make_request(f"r{i}", 12 + i, images=images, max_tokens=5, ignore_eos=True))


@pytest.mark.parametrize("culprit", ["r0", "r3", "r5"])
def test_only_the_request_that_makes_steps_fail_ends_with_an_error(culprit):
    reference_core, _ = _engine()
    _workload(reference_core)
    reference = _run(reference_core)

    core, runner = _engine(fail_if=lambda out: culprit in out.num_scheduled_tokens)
    _workload(core)
    results = _run(core)
    assert results.pop(culprit) == ([], "error")
    assert results == {r: v for r, v in reference.items() if r != culprit}
    assert all(reason == "length" and len(tokens) == 5 for tokens, reason in results.values())
    # 6 requests in the first batch: isolated in about log2(6) failed steps.
    assert runner.num_failed <= 4 and core.num_failed_steps == runner.num_failed
    assert runner.violations == []
    sched = core.scheduler
    assert sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks
    assert sched.encoder_cache.num_freeable_rows == sched.encoder_cache.cache_size
    assert not sched.culprits.active


def test_a_fault_in_a_late_decode_step_is_still_pinned_on_its_request():
    # The culprit fails only once it has sampled 3 tokens, with the others mid-decode.
    def fail_if(out):
        req = core.scheduler.requests.get("r2")
        return "r2" in out.num_scheduled_tokens and req is not None and req.num_output_tokens >= 3

    reference_core, _ = _engine()
    _workload(reference_core)
    reference = _run(reference_core)
    core, runner = _engine(fail_if=fail_if)
    _workload(core)
    results = _run(core)
    assert results.pop("r2")[1] == "error"
    assert results == {r: v for r, v in reference.items() if r != "r2"}
    assert runner.violations == []


def test_a_group_that_cannot_run_beside_paused_requests_preempts_them():
    # A tiny KV pool: the retried group needs blocks the requests it pauses hold.
    sched = Scheduler(EngineConfig(block_size=4, max_num_batched_tokens=8), num_kv_blocks=10, max_model_len=64)
    runner = FakeRunner(sched, fail_if=lambda out: "b" in out.num_scheduled_tokens and len(out.num_scheduled_tokens) > 1)
    core = EngineCore(sched, runner)
    for r in ("a", "b", "c"):
        core.add_request(make_request(r, 12, max_tokens=6, ignore_eos=True))
    results = _run(core)
    # "b" fails only beside others: alone it is fine, so nobody is blamed.
    assert {r: reason for r, (_, reason) in results.items()} == {"a": "length", "b": "length", "c": "length"}
    assert runner.violations == [] and sched.kv_cache.num_free_blocks == 10


def test_steps_failing_with_every_request_mean_the_engine_is_broken():
    core, runner = _engine(fail_if=lambda out: bool(out.num_scheduled_tokens))
    _workload(core)
    with pytest.raises(RuntimeError, match="simulated fault"):
        _run(core)
    # Three requests blamed alone in a row, after a few steps splitting the batch.
    assert runner.num_failed < 3 * MAX_CONSECUTIVE_STEP_FAILURES
