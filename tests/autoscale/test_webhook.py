"""The scale webhook: overload only when sustained, cooldown between overload events, a
recovery event, and delivery off-thread with a timeout and bounded retries."""

from __future__ import annotations

import time

import pytest

from tests.autoscale.webhook_receiver import WebhookReceiver
from vlmserve.autoscale.webhook import OverloadDetector, WebhookSender, check_webhook_url


def test_overload_must_be_sustained_then_cooldown_bounds_repeats_then_recovery() -> None:
    d = OverloadDetector(target_s=1.0, sustain_s=3.0, cooldown_s=10.0)
    assert d.update(0.0, 5.0) is None
    assert d.update(2.9, 5.0) is None  # not yet sustained
    assert d.update(3.0, 5.0) == "overload"
    assert [d.update(t, 5.0) for t in (4.0, 8.0, 12.9)] == [None, None, None]  # cooling down
    assert d.update(13.0, 5.0) == "overload"  # still overloaded after the cooldown: a repeat
    assert d.update(14.0, 0.5) is None  # back under target, not yet for long enough
    assert d.update(16.0, 1.5) is None  # a blip above resets the clock
    assert d.update(17.0, 0.5) is None
    assert d.update(20.0, 0.5) == "recovery"
    assert d.update(30.0, 0.5) is None  # one recovery per overload


def test_a_short_spike_sends_nothing_and_a_new_overload_waits_out_the_cooldown() -> None:
    d = OverloadDetector(target_s=1.0, sustain_s=2.0, cooldown_s=30.0)
    assert [d.update(t, 9.0) for t in (0.0, 1.0)] + [d.update(1.5, 0.1), d.update(5.0, 0.1)] == [None] * 4
    assert d.update(6.0, 9.0) is None and d.update(8.0, 9.0) == "overload"
    assert d.update(9.0, 0.0) is None and d.update(11.0, 0.0) == "recovery"
    assert d.update(12.0, 9.0) is None and d.update(14.0, 9.0) is None  # within 30 s of the last
    assert d.update(38.0, 9.0) == "overload"


def test_sender_retries_server_errors_and_delivers_in_order() -> None:
    with WebhookReceiver(statuses=[500, 503]) as rx:
        deliveries = []
        sender = WebhookSender([rx.url], backoff_s=0.01, on_delivery=deliveries.append)
        sender.send({"event": "overload", "n": 1})
        sender.send({"event": "recovery", "n": 2})
        events = rx.wait_for(2, timeout=10)
        sender.close()
    assert [e["n"] for e in events] == [1, 2]
    assert rx.attempts == 4  # two refused attempts, then each event once
    assert [(d.status_code, d.attempts) for d in deliveries] == [(200, 3), (200, 1)]


def test_sender_gives_up_after_bounded_attempts_and_times_out_a_slow_receiver() -> None:
    with WebhookReceiver(delay_s=1.0) as rx:
        deliveries = []
        sender = WebhookSender([rx.url], timeout_s=0.2, attempts=2, backoff_s=0.01, on_delivery=deliveries.append)
        t0 = time.monotonic()
        sender.send({"event": "overload"})  # returns at once: delivery is on the sender thread
        assert time.monotonic() - t0 < 0.1
        deadline = time.monotonic() + 10
        while not deliveries and time.monotonic() < deadline:
            time.sleep(0.02)
        sender.close()
    assert [(d.status_code, d.attempts) for d in deliveries] == [(None, 2)]
    assert time.monotonic() - t0 < 5


def test_webhook_urls_must_be_http_but_loopback_is_allowed() -> None:
    assert check_webhook_url("http://127.0.0.1:9/x") == "http://127.0.0.1:9/x"
    for bad in ("ftp://example.com/", "file:///etc/passwd", "127.0.0.1:80", "http:///nohost"):
        with pytest.raises(ValueError, match="--scale-webhook"):
            check_webhook_url(bad)
