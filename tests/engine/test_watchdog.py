"""StepWatchdog: silence with work pending is death; silence while idle is not."""

from __future__ import annotations

import pytest

from vlmserve.engine.watchdog import StepWatchdog


def test_silence_while_work_is_pending_trips_it_and_idle_silence_does_not() -> None:
    w = StepWatchdog(5.0)
    assert w.check(1000.0, num_pending=0) is None  # idle since start
    assert w.check(1000.0, num_pending=3) is not None  # work but no progress ever recorded
    w.progress(1000.0)  # work arrived at an idle loop
    assert w.check(1004.9, num_pending=3) is None
    message = w.check(1005.1, num_pending=3)
    assert "no progress for 5.1 s" in message and "3 request(s)" in message and "--engine-watchdog-s 5" in message
    w.progress(1005.2)
    assert w.check(1009.0, num_pending=3) is None
    assert w.check(2000.0, num_pending=0) is None


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ValueError, match="--engine-watchdog-s"):
        StepWatchdog(0)
