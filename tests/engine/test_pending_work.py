"""The scheduler's pending-work counters equal a recount over every queued request, through
arrivals, chunked prefill, encoder-cache hits and evictions, preemptions, aborts and failures."""

from __future__ import annotations

import random

import pytest

from vlmserve.engine.request import RequestStatus
from vlmserve.engine.scheduler import Scheduler
from tests.engine.test_scheduler import make_request, make_scheduler, run_step


def recount(sched: Scheduler) -> tuple[int, int]:
    """What get_stats computed before the counters: a pass over every queued request."""
    tokens = sum(r.num_tokens for r in sched.waiting) + sum(
        max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in sched.running
    )
    rows = sum(
        item.encoder_rows
        for r in (*sched.waiting, *sched.running)
        for item in r.mm_items
        if item.offset + item.length > r.num_computed_tokens and not sched.encoder_cache.contains(item.content_hash)
    )
    return tokens, rows


def recount_by_modality(sched: Scheduler) -> tuple[int, int, int]:
    """(text, image, video): an item's LM positions left plus its pending rows for its modality."""
    tokens, rows = recount(sched)
    media = {"image": 0, "video": 0}
    for r in (*sched.waiting, *sched.running):
        done = r.num_computed_tokens
        for item in r.mm_items:
            if item.offset + item.length <= done:
                continue
            work = item.offset + item.length - max(item.offset, done)
            if not sched.encoder_cache.contains(item.content_hash):
                work += item.encoder_rows
            media["video" if item.modality == "video" else "image"] += work
    return tokens + rows - media["image"] - media["video"], media["image"], media["video"]


def recount_budgets(sched: Scheduler) -> tuple[int, int, int]:
    waiting = sum(r.sampling_params.max_tokens for r in sched.waiting)
    queued = (*sched.waiting, *sched.running)
    return waiting, sum(r.sampling_params.max_tokens for r in queued), len(queued)


@pytest.mark.parametrize("seed", range(4))
def test_counters_equal_a_recount_every_step(seed: int) -> None:
    rng = random.Random(seed)
    # Few KV blocks (preemptions), a small encoder cache (evictions), chunked prefill.
    sched = make_scheduler(num_blocks=24, max_model_len=96, max_num_batched_tokens=12, max_num_seqs=4,
                           encoder_cache_size=12, max_encoder_tokens_per_step=12)
    hashes = ["a", "b", "c", "d", "e"]
    n = 0
    saw = {"preempt": False, "evict": False}
    for step in range(120):
        if rng.random() < 0.5 and n < 40:
            length = rng.randint(8, 40)
            images = []
            if rng.random() < 0.7:
                offset = rng.randint(0, length - 6)
                images.append((rng.choice(hashes), offset, rng.randint(2, 5)))
            request = make_request(f"q{n}", length, images=images, max_tokens=rng.randint(1, 12))
            if images and rng.random() < 0.3:
                request.mm_items[0].modality = "video"  # its own hash space: videos are keyed apart
                request.mm_items[0].content_hash = "v" + request.mm_items[0].content_hash
            sched.add_request(request)
            n += 1
        if rng.random() < 0.08 and sched.requests:
            sched.finish_requests(rng.choice(sorted(sched.requests)), RequestStatus.FINISHED_ABORTED)
        preemptions, cached = sched.num_preemptions, set(sched.encoder_cache._rows)
        if sched.has_unfinished_requests():
            if rng.random() < 0.05:
                sched.fail_step(sched.schedule())
            else:
                run_step(sched)
        saw["preempt"] |= sched.num_preemptions > preemptions
        saw["evict"] |= bool(cached - set(sched.encoder_cache._rows))
        stats = sched.get_stats()
        assert (stats.num_pending_prefill_tokens, stats.num_pending_encoder_rows) == recount(sched), step
        by_modality = (stats.pending_work_text, stats.pending_work_image, stats.pending_work_video)
        assert by_modality == recount_by_modality(sched), step
        p = sched._pending
        assert (p.waiting_budget, p.total_budget, p.num_tracked) == recount_budgets(sched), step
    assert saw["preempt"] and saw["evict"]
