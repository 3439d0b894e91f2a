"""Admission policy: 429 past the queue-wait or waiting-requests limit, Retry-After from the
estimate in whole seconds."""

from __future__ import annotations

import pytest

from vlmserve.autoscale.admission import AdmissionPolicy
from vlmserve.autoscale.signals import ThroughputEstimator, compute_signals


def _signals(wait_work: float, waiting: int = 0):
    est = ThroughputEstimator(prior_work_per_s=1000.0)
    return compute_signals({"pending_work_text": wait_work, "num_waiting": waiting}, est, target_queue_wait_s=1.0)


def test_no_limits_admit_everything() -> None:
    assert AdmissionPolicy().decide(_signals(1e9, waiting=10**6)) is None


def test_estimated_wait_over_the_limit_is_refused_with_retry_after_rounded_up() -> None:
    policy = AdmissionPolicy(max_queue_wait_s=2.0)
    assert policy.decide(_signals(2000)) is None  # exactly 2 s: admitted
    r = policy.decide(_signals(2300))
    assert (r.reason, r.status_code, r.retry_after_s) == ("queue_wait", 429, 3)
    assert "2.30 s" in r.message and "--max-queue-wait-s" in r.message


def test_waiting_requests_limit() -> None:
    policy = AdmissionPolicy(max_waiting_requests=5)
    assert policy.decide(_signals(0, waiting=4)) is None
    r = policy.decide(_signals(100, waiting=5))
    assert (r.reason, r.status_code, r.retry_after_s) == ("waiting_requests", 429, 1)
    assert "--max-waiting-requests 5" in r.message


@pytest.mark.parametrize("kwargs", [{"max_queue_wait_s": 0}, {"max_queue_wait_s": -1}, {"max_waiting_requests": -1}])
def test_bad_limits_are_refused(kwargs) -> None:
    with pytest.raises(ValueError, match="--max-"):
        AdmissionPolicy(**kwargs)
