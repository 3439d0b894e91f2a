"""The queue-wait estimate: decayed throughput with a prior, pending work, slot wait, and the
desired-replicas hint."""

from __future__ import annotations

import pytest

from vlmserve.autoscale.signals import (
    PRIOR_WORK_PER_S,
    ThroughputEstimator,
    compute_signals,
    desired_replicas,
)


def test_prior_stands_in_until_measurements_outweigh_it() -> None:
    est = ThroughputEstimator(half_life_s=1.0, prior_work_per_s=1000.0, prior_seconds=1.0)
    assert est.work_per_s == pytest.approx(1000.0)
    for _ in range(100):  # 10 s of steps at 200 work/s: 10 half-lives
        est.observe(0.1, 20)
    assert est.work_per_s == pytest.approx(200.0, rel=0.01)
    assert est.step_s == pytest.approx(0.1, rel=0.01)


def test_recent_steps_weigh_more_than_old_ones() -> None:
    est = ThroughputEstimator(half_life_s=2.0)
    for _ in range(50):
        est.observe(0.1, 100)  # 1000/s
    for _ in range(20):
        est.observe(0.1, 400)  # 4000/s for one half-life
    assert 2000 < est.work_per_s < 3000  # about halfway: a decayed mean, not the all-time mean
    est.observe(0.0, 10_000)  # a zero-length sample carries no rate
    assert est.work_per_s < 3000


def test_wait_is_pending_work_over_throughput_plus_slot_wait() -> None:
    est = ThroughputEstimator(half_life_s=1.0)
    for _ in range(200):
        est.observe(0.05, 100)  # 2000 work/s, 50 ms steps
    stats = {"pending_work_text": 1000, "pending_work_image": 2000, "pending_work_video": 1000,
             "slot_wait_steps": 20, "num_waiting": 7, "num_running": 4, "kv_cache_usage": 0.5}
    sig = compute_signals(stats, est, target_queue_wait_s=1.0)
    assert sig.prefill_wait_s == pytest.approx(2.0, rel=0.01)
    assert sig.slot_wait_s == pytest.approx(1.0, rel=0.01)
    assert sig.estimated_queue_wait_s == pytest.approx(3.0, rel=0.01)
    assert sig.desired_replicas == 3
    assert sig.pending_prefill_tokens == {"text": 1000, "image": 2000, "video": 1000}
    # Requests handed to the engine but not in its stats yet count as waiting.
    assert compute_signals(stats, est, target_queue_wait_s=1.0, num_unfinished=20).num_waiting == 16


def test_idle_engine_estimates_no_wait_and_one_replica() -> None:
    sig = compute_signals({}, ThroughputEstimator(), target_queue_wait_s=1.0)
    assert sig.estimated_queue_wait_s == 0 and sig.desired_replicas == 1
    assert sig.work_per_s == pytest.approx(PRIOR_WORK_PER_S)


@pytest.mark.parametrize("current, load, target, want", [
    (1, 0.0, 1.0, 1), (1, 1.0, 1.0, 1), (1, 1.01, 1.0, 2), (2, 3.0, 1.0, 6), (4, 0.5, 2.0, 1),
])
def test_desired_replicas_is_ceil_of_current_times_load_over_target(current, load, target, want) -> None:
    assert desired_replicas(current, load, target) == want
