"""The scheduler's load statistics (engine/load_stats.py): pending prefill work split by
modality, and the steps a newcomer waits for a sequence slot (what the autoscaling estimate
is built on)."""

from __future__ import annotations

from tests.engine.test_scheduler import make_request, make_scheduler, run_step
from vlmserve.multimodal.inputs import MultiModalItem


def test_pending_work_is_split_by_modality_and_sums_tokens_and_encoder_rows() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    req = make_request("a", 30, images=[("img", 4, 6)])
    req.mm_items.append(MultiModalItem("video", "vid", 14, 8, data={}))
    sched.add_request(req)
    stats = sched.get_stats()
    # 30 prompt tokens: 16 text, 6 image positions + 6 encoder rows, 8 video positions + 8 rows.
    assert (stats.pending_work_text, stats.pending_work_image, stats.pending_work_video) == (16, 12, 16)
    assert stats.num_pending_prefill_tokens == 30 and stats.num_pending_encoder_rows == 14
    total = stats.pending_work_text + stats.pending_work_image + stats.pending_work_video
    assert total == stats.num_pending_prefill_tokens + stats.num_pending_encoder_rows

    run_step(sched)  # the first chunk [0, 8) covers part of the image: encoded now, cached
    stats = sched.get_stats()
    # image: positions 8, 9 are left, its rows are cached; video: all 8 positions and rows.
    assert (stats.pending_work_text, stats.pending_work_image, stats.pending_work_video) == (12, 2, 16)


def test_slot_wait_counts_the_output_budgets_left_to_running_requests() -> None:
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    assert sched.get_stats().slot_wait_steps == 0
    sched.add_request(make_request("a", 4, max_tokens=10))
    sched.add_request(make_request("b", 4, max_tokens=30))
    run_step(sched)  # both running, one token out each
    assert sched.get_stats().slot_wait_steps == 9  # the newcomer takes a's slot: 9 steps left
    sched.add_request(make_request("c", 4, max_tokens=20))
    assert sched.get_stats().slot_wait_steps == 29  # behind c: b's slot
    sched.add_request(make_request("d", 4, max_tokens=40))
    # behind c and d: a second round, a's slot again after one mean waiting budget (30).
    assert sched.get_stats().slot_wait_steps == 9 + 30
