"""Scheduler: token-budget batching, chunked prefill, encoder scheduling, preemption,
prefix caching and finishing, driven by hand-built runner outputs (no model)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from vlmserve.config import EngineConfig
from vlmserve.engine.outputs import EngineCoreOutput, RunnerOutput, SchedulerOutput
from vlmserve.engine.request import Request, RequestStatus
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.engine.scheduler import Scheduler
from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt

IMG = 9
EOS = 2
_prompt_ids = itertools.count(1)


def make_scheduler(num_blocks: int = 64, max_model_len: int = 256, **cfg) -> Scheduler:
    cfg.setdefault("block_size", 4)
    return Scheduler(EngineConfig(**cfg), num_kv_blocks=num_blocks, max_model_len=max_model_len)


def make_request(
    req_id: str,
    num_tokens: int = 0,
    images: list[tuple[str, int, int]] = (),
    tokens: list[int] | None = None,
    **params,
) -> Request:
    """`images`: (content_hash, offset, length); their placeholder ids are IMG. Without
    `tokens`, every request gets its own ids, so prefix-cache hits happen only on purpose."""
    if tokens is None:
        base = 1000 * next(_prompt_ids)
        tokens = [base + i for i in range(num_tokens)]
    ids = list(tokens)
    items = []
    for content_hash, offset, length in images:
        ids[offset : offset + length] = [IMG] * length
        items.append(MultiModalItem("image", content_hash, offset, length, data={}))
    params.setdefault("max_tokens", 4)
    prompt = ProcessedPrompt(prompt_token_ids=ids, mm_items=items)
    return Request(req_id, prompt, SamplingParams(**params), eos_token_ids=frozenset({EOS}))


def run_step(
    sched: Scheduler, tokens: dict[str, list[int]] | None = None, default: int = 7
) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    """Schedules, then plays the runner: a request whose known tokens are all computed
    samples `tokens[req_id]` (or `[default]`); one mid-prefill samples nothing."""
    out = sched.schedule()
    sampled = {}
    for req_id in out.num_scheduled_tokens:
        req = sched.requests[req_id]
        done = req.num_computed_tokens == req.num_tokens
        sampled[req_id] = (tokens or {}).get(req_id, [default]) if done else []
    runner = RunnerOutput(req_ids=list(out.num_scheduled_tokens), sampled_token_ids=sampled)
    return out, sched.update(out, runner)


def drain(sched: Scheduler, max_steps: int = 200) -> list[SchedulerOutput]:
    outs = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return outs
        outs.append(run_step(sched)[0])
    raise AssertionError("requests did not finish")


def all_blocks_free(sched: Scheduler) -> bool:
    return sched.kv_cache.num_free_blocks == sched.kv_cache.num_blocks


# ---- batching ------------------------------------------------------------------------------


def test_decode_and_prefill_chunks_share_one_step() -> None:
    sched = make_scheduler(max_num_batched_tokens=10)
    sched.add_request(make_request("a", 4))
    sched.add_request(make_request("b", 20))
    out1, res1 = run_step(sched)
    assert out1.num_scheduled_tokens == {"a": 4, "b": 6}
    assert [r.req_id for r in out1.scheduled_new_reqs] == ["a", "b"]
    assert [o.req_id for o in res1] == ["a"]  # b is mid-prefill: no output
    out2, _ = run_step(sched)
    assert out2.num_scheduled_tokens == {"a": 1, "b": 9}
    assert out2.scheduled_cached_reqs.req_ids == ["a", "b"]
    assert out2.scheduled_cached_reqs.num_computed_tokens == [4, 6]
    assert out2.scheduled_new_reqs == []


def test_token_budget_and_max_num_seqs_are_respected() -> None:
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=2)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 12))
    for out in drain(sched):
        assert out.total_num_scheduled_tokens <= 16
        assert len(out.num_scheduled_tokens) <= 2
        if "r2" in {r.req_id for r in out.scheduled_new_reqs}:
            # Admitted only once a slot freed: r0 or r1 finished in the previous update.
            assert out.finished_req_ids & {"r0", "r1"}
    assert all_blocks_free(sched)


def test_long_prompt_is_chunked_and_completes() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("a", 25, max_tokens=3))
    chunks = []
    outputs: list[int] = []
    for _ in range(10):
        out, res = run_step(sched)
        chunks.append(out.num_scheduled_tokens.get("a", 0))
        outputs += [t for o in res for t in o.new_token_ids]
        if res and res[0].finish_reason:
            assert res[0].finish_reason == "length"
            break
    assert chunks == [8, 8, 8, 1, 1, 1]
    assert outputs == [7, 7, 7]
    assert run_step(sched)[0].finished_req_ids == {"a"}
    assert all_blocks_free(sched)


# ---- encoder scheduling --------------------------------------------------------------------


def test_chunk_ends_before_an_image_that_cannot_be_encoded_this_step() -> None:
    sched = make_scheduler(max_encoder_tokens_per_step=8, encoder_cache_size=64)
    sched.add_request(make_request("a", 24, images=[("i0", 2, 8), ("i1", 12, 8)]))
    out1, _ = run_step(sched)
    assert out1.scheduled_encoder_inputs == {"a": [0]}
    assert out1.num_scheduled_tokens == {"a": 12}  # stops at i1's offset, not inside it
    out2, _ = run_step(sched)
    assert out2.scheduled_encoder_inputs == {"a": [1]}
    assert out2.num_scheduled_tokens == {"a": 12}


def test_request_inside_an_image_waits_when_the_encoder_cache_is_full() -> None:
    sched = make_scheduler(max_num_batched_tokens=6, encoder_cache_size=10)
    sched.add_request(make_request("a", 16, images=[("ia", 2, 10)]))
    sched.add_request(make_request("b", 16, images=[("ib", 0, 10)]))
    out1, _ = run_step(sched)
    # a holds 10 of 10 rows until it passes its image; b's first chunk starts at ib.
    assert out1.num_scheduled_tokens == {"a": 6}
    assert out1.scheduled_encoder_inputs == {"a": [0]}
    run_step(sched)  # a: tokens 6..12, passes the image; b still cannot start
    out3, _ = run_step(sched)
    assert out3.scheduled_encoder_inputs == {"b": [0]}
    assert out3.free_encoder_hashes == ["ia"]


def test_image_is_encoded_once_across_chunks_and_freed_only_under_pressure() -> None:
    sched = make_scheduler(max_num_batched_tokens=5, encoder_cache_size=12)
    sched.add_request(make_request("a", 14, images=[("img", 2, 10)], max_tokens=1))
    outs = drain(sched)
    encoded = [o.scheduled_encoder_inputs for o in outs if o.scheduled_encoder_inputs]
    assert encoded == [{"a": [0]}]
    assert all(o.free_encoder_hashes == [] for o in outs)
    assert sched.encoder_cache.contains("img")
    # Only when another image needs the rows is the old entry dropped and reported.
    sched.add_request(make_request("b", 12, images=[("other", 0, 10)], max_tokens=1))
    out, _ = run_step(sched)
    assert out.free_encoder_hashes == ["img"]
    assert out.scheduled_encoder_inputs == {"b": [0]}


def test_new_image_before_a_cached_one_in_one_chunk_does_not_count_the_cached_one_as_evictable() -> None:
    # "old" (4 rows) is cached and unreferenced: 6 rows free, 10 freeable. The next chunk
    # holds a new image of 8 rows, then "old" again: encoding the new one needs "old"'s rows,
    # but the chunk also needs "old" itself. The chunk must stop before "old" (the new image
    # evicts it) instead of planning both and failing to allocate.
    sched = make_scheduler(encoder_cache_size=10, enable_prefix_caching=False)
    sched.add_request(make_request("turn1", 8, images=[("old", 2, 4)], max_tokens=1))
    drain(sched)
    assert sched.encoder_cache.contains("old") and sched.encoder_cache.num_free_rows == 6
    sched.add_request(make_request("turn2", 20, images=[("new", 1, 8), ("old", 12, 4)], max_tokens=1))
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == {"turn2": 12}
    assert out.scheduled_encoder_inputs == {"turn2": [0]}
    assert out.free_encoder_hashes == ["old"]
    out, _ = run_step(sched)  # "new" is passed and unreferenced: evicted for "old"
    assert out.scheduled_encoder_inputs == {"turn2": [1]}
    assert out.free_encoder_hashes == ["new"]
    drain(sched)
    assert all_blocks_free(sched) and sched.encoder_cache.num_freeable_rows == 10


def test_a_cached_image_referenced_by_the_chunk_is_kept_when_the_new_image_fits_beside_it() -> None:
    sched = make_scheduler(encoder_cache_size=12, enable_prefix_caching=False)
    sched.add_request(make_request("turn1", 8, images=[("old", 2, 4)], max_tokens=1))
    drain(sched)
    sched.add_request(make_request("turn2", 20, images=[("new", 1, 8), ("old", 12, 4)], max_tokens=1))
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == {"turn2": 20}
    assert out.scheduled_encoder_inputs == {"turn2": [0]}
    assert out.free_encoder_hashes == []
    assert sched.get_stats().encoder_cache_hits == 1


def test_image_sent_again_in_a_later_turn_is_not_reencoded() -> None:
    sched = make_scheduler(enable_prefix_caching=False)
    sched.add_request(make_request("turn1", 14, images=[("img", 2, 10)], max_tokens=1))
    drain(sched)
    sched.add_request(make_request("turn2", 20, images=[("img", 2, 10)], max_tokens=1))
    out, _ = run_step(sched)
    assert out.scheduled_encoder_inputs == {}
    assert sched.get_stats().encoder_cache_hits == 1


def test_two_requests_with_the_same_image_in_one_step_encode_it_once() -> None:
    sched = make_scheduler(enable_prefix_caching=False)
    sched.add_request(make_request("a", 14, images=[("img", 2, 10)]))
    sched.add_request(make_request("b", 16, images=[("img", 4, 10)]))
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 14, "b": 16}
    assert out.scheduled_encoder_inputs == {"a": [0]}


def test_same_image_twice_in_one_prompt_is_encoded_once() -> None:
    sched = make_scheduler(encoder_cache_size=10)
    sched.add_request(make_request("a", 24, images=[("img", 2, 10), ("img", 13, 10)]))
    out, _ = run_step(sched)
    assert out.num_scheduled_tokens == {"a": 24}
    assert out.scheduled_encoder_inputs == {"a": [0]}
    assert sched.encoder_cache.held_input_ids(sched.requests["a"]) == []  # both passed


def test_image_inside_a_prefix_cache_hit_is_not_encoded() -> None:
    sched = make_scheduler(encoder_cache_size=10)
    tokens = [10 + i for i in range(20)]
    sched.add_request(make_request("a", tokens=tokens, images=[("img", 2, 10)], max_tokens=1))
    drain(sched)
    sched.add_request(make_request("filler", 12, images=[("other", 0, 10)], max_tokens=1))
    drain(sched)  # evicts "img" from the encoder cache; its KV blocks stay cached
    assert not sched.encoder_cache.contains("img")
    sched.add_request(make_request("b", tokens=tokens, images=[("img", 2, 10)], max_tokens=1))
    out, res = run_step(sched)
    assert out.scheduled_new_reqs[0].num_computed_tokens == 16
    assert out.num_scheduled_tokens == {"b": 4}
    assert out.scheduled_encoder_inputs == {}
    assert res[0].num_cached_tokens == 16


# ---- preemption ----------------------------------------------------------------------------


def test_preemption_evicts_the_last_admitted_which_resumes_with_its_outputs() -> None:
    # 4 blocks of 4: a and b take 2 each; at token 8 a needs a third block.
    sched = make_scheduler(num_blocks=4, max_model_len=64)
    sched.add_request(make_request("a", 7, max_tokens=4))
    sched.add_request(make_request("b", 7, max_tokens=4))
    run_step(sched, tokens={"a": [21], "b": [31]})
    run_step(sched, tokens={"a": [22], "b": [32]})
    sched.add_request(make_request("c", 3))
    out3, res3 = run_step(sched, tokens={"a": [23]})
    assert out3.preempted_req_ids == {"b"}
    assert out3.num_scheduled_tokens == {"a": 1}  # nobody admitted in a preempting step
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    b = sched.requests["b"]
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    # a finishes at max_tokens, then b comes back as a new request with its outputs.
    _, res4 = run_step(sched, tokens={"a": [24]})
    assert res4[0].finish_reason == "length"
    out5, res5 = run_step(sched, tokens={"b": [33]})
    resumed = {r.req_id: r for r in out5.scheduled_new_reqs}["b"]
    assert resumed.token_ids == b.prompt_token_ids + [31, 32]
    assert resumed.block_ids == sched.kv_cache.get_block_ids("b")
    assert [o.new_token_ids for o in res5 if o.req_id == "b"] == [[33]]
    assert sched.get_stats().num_preemptions == 1
    drain(sched)
    assert b.output_token_ids == [31, 32, 33, 7]
    assert all_blocks_free(sched)


def test_request_that_must_preempt_itself_stops_the_step() -> None:
    sched = make_scheduler(num_blocks=3, max_model_len=64)
    sched.add_request(make_request("a", 5, max_tokens=8))  # 2 blocks
    sched.add_request(make_request("b", 4, max_tokens=8))  # 1 block
    run_step(sched)
    out, _ = run_step(sched)  # a fits in its blocks; b needs a 2nd one: b is the last
    assert out.preempted_req_ids == {"b"}
    assert out.num_scheduled_tokens == {"a": 1}
    assert sched.waiting[0].request_id == "b"
    drain(sched)
    assert all_blocks_free(sched)


def test_many_requests_under_a_tiny_pool_all_finish_and_free_every_block() -> None:
    sched = make_scheduler(num_blocks=6, max_model_len=64, max_num_batched_tokens=16)
    reqs = [make_request(f"r{i}", 6 + i, max_tokens=8) for i in range(5)]
    for req in reqs:
        sched.add_request(req)
    drain(sched, max_steps=500)
    assert sched.get_stats().num_preemptions > 0
    assert [r.num_output_tokens for r in reqs] == [8] * 5
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in reqs)
    assert all_blocks_free(sched)
    assert not sched.requests


# ---- finishing -----------------------------------------------------------------------------


def finish_one(req: Request, samples: list[list[int]], max_model_len: int = 256):
    sched = make_scheduler(max_model_len=max_model_len)
    sched.add_request(req)
    got: list[int] = []
    for s in samples:
        _, res = run_step(sched, tokens={req.request_id: s})
        got += res[0].new_token_ids
        if res[0].finish_reason:
            return got, res[0].finish_reason, res[0].stop_reason
    return got, None, None


def test_eos_stops_and_truncates_the_tokens_sampled_after_it() -> None:
    assert finish_one(make_request("a", 4), [[5], [EOS, 8]]) == ([5, EOS], "stop", None)


def test_ignore_eos_keeps_going_until_max_tokens() -> None:
    req = make_request("a", 4, max_tokens=3, ignore_eos=True)
    assert finish_one(req, [[EOS], [EOS], [EOS]]) == ([EOS] * 3, "length", None)


def test_min_tokens_delays_eos_and_stop_token_ids() -> None:
    req = make_request("a", 4, min_tokens=3, stop_token_ids=(40,))
    assert finish_one(req, [[EOS], [40], [EOS]]) == ([EOS, 40, EOS], "stop", None)
    req = make_request("b", 4, min_tokens=2, stop_token_ids=(40,))
    assert finish_one(req, [[EOS], [40]]) == ([EOS, 40], "stop", 40)


def test_stop_token_id_stops_with_it_as_stop_reason() -> None:
    req = make_request("a", 4, stop_token_ids=(40, 41))
    assert finish_one(req, [[5], [41]]) == ([5, 41], "stop", 41)


def test_max_tokens_and_max_model_len_finish_by_length() -> None:
    assert finish_one(make_request("a", 4, max_tokens=2), [[5]] * 5) == ([5, 5], "length", None)
    req = make_request("b", 6, max_tokens=100)
    assert finish_one(req, [[5]] * 10, max_model_len=8) == ([5, 5], "length", None)


# ---- abort, admission checks, stats ---------------------------------------------------------


def test_abort_frees_blocks_reports_the_id_and_drops_its_runner_output() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 9, images=[("img", 2, 4)]))
    sched.add_request(make_request("b", 9))
    out = sched.schedule()
    sched.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    runner = RunnerOutput(["a", "b"], sampled_token_ids={"a": [5], "b": [6]})
    res = sched.update(out, runner)
    assert [o.req_id for o in res] == ["b"]
    assert sched.kv_cache.get_block_ids("a") == []
    assert sched.encoder_cache.num_freeable_rows == sched.encoder_cache.cache_size
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert sched.schedule().finished_req_ids == {"a", "b"}
    assert all_blocks_free(sched) and not sched.has_unfinished_requests()


def test_abort_of_a_waiting_request_removes_it_from_the_queue() -> None:
    sched = make_scheduler(max_num_seqs=1)
    sched.add_request(make_request("a", 4))
    sched.add_request(make_request("b", 4))
    run_step(sched)
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert list(sched.waiting) == []
    assert run_step(sched)[0].finished_req_ids == {"b"}


def test_add_request_rejects_what_can_never_run() -> None:
    sched = make_scheduler(num_blocks=4, max_model_len=32, encoder_cache_size=8)
    with pytest.raises(ValueError, match="32 tokens but max_model_len is 32"):
        sched.add_request(make_request("long", 32))
    with pytest.raises(ValueError, match="20 tokens but the whole KV cache holds 16"):
        sched.add_request(make_request("pool", 20))
    with pytest.raises(ValueError, match="needs 10 encoder rows but at most 8"):
        sched.add_request(make_request("img", 12, images=[("big", 1, 10)]))
    assert not sched.has_unfinished_requests()


def test_stats_report_queues_usage_and_pending_work() -> None:
    sched = make_scheduler(max_num_batched_tokens=8, max_num_seqs=1)
    sched.add_request(make_request("a", 20, images=[("ia", 10, 6)]))
    sched.add_request(make_request("b", 12, images=[("ib", 0, 4)]))
    run_step(sched)  # a: 8 prompt tokens computed, image not reached yet
    stats = sched.get_stats()
    assert (stats.num_running, stats.num_waiting) == (1, 1)
    assert stats.num_pending_prefill_tokens == 12 + 12
    assert stats.num_pending_encoder_rows == 6 + 4
    assert stats.kv_cache_usage == pytest.approx(2 / 64)


def test_scheduler_and_cache_managers_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import vlmserve.engine.scheduler, vlmserve.engine.kv_cache_manager\n"
        "import vlmserve.engine.encoder_cache_manager, vlmserve.engine.block_pool\n"
        "assert 'torch' not in sys.modules, 'the scheduler side must stay torch-free'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
