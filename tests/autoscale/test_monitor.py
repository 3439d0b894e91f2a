"""LoadMonitor over a stand-in engine: step samples feed the estimate once per step, the
ticker turns a sustained overload into one webhook event with the documented fields, and
/v1/load's report carries the signals and the lifecycle."""

from __future__ import annotations

import pytest

from tests.autoscale.webhook_receiver import WebhookReceiver
from vlmserve.autoscale.monitor import LoadMonitor


class _Engine:
    def __init__(self) -> None:
        self.stats: dict[str, float] = {}
        self.step_observers: list = []
        self.num_unfinished = 0
        self.draining = False
        self.phase = "serving"

    def snapshot(self) -> dict[str, float]:
        return dict(self.stats)

    def is_healthy(self) -> bool:
        return True

    def is_ready(self) -> bool:
        return not self.draining


def test_each_step_is_sampled_once_and_sets_the_measured_rate() -> None:
    engine = _Engine()
    monitor = LoadMonitor(engine, model_name="m")
    for steps in range(1, 601):  # 30 s of steps: six half-lives, the prior has faded
        for observe in engine.step_observers:  # each step's stats, twice (an idle publish repeats them)
            observe({"steps": steps, "step_cycle_s": 0.05, "step_tokens": 90, "step_encoder_rows": 10})
            observe({"steps": steps, "step_cycle_s": 0.05, "step_tokens": 90, "step_encoder_rows": 10})
    assert monitor.estimator.num_samples == 600
    assert monitor.estimator.work_per_s == pytest.approx(2000, rel=0.02)


def test_sustained_overload_posts_one_event_with_the_documented_fields() -> None:
    engine = _Engine()
    with WebhookReceiver() as rx:
        monitor = LoadMonitor(engine, model_name="m", target_queue_wait_s=1.0, webhooks=(rx.url,),
                              webhook_cooldown_s=60, webhook_sustain_s=2)
        engine.stats = {"pending_work_image": 3 * 4096 + 1, "num_waiting": 9, "num_running": 4,
                        "kv_cache_usage": 0.75}
        assert [monitor.tick(t) for t in (0.0, 1.0, 1.9)] == [None, None, None]
        event = monitor.tick(2.0)
        assert monitor.tick(3.0) is None  # cooling down
        (body,) = rx.wait_for(1, timeout=5)
        monitor.close()
    assert body == event
    assert body["event"] == "overload" and body["model"] == "m"
    assert body["desired_replicas"] == 4 and body["num_waiting"] == 9 and body["num_running"] == 4
    assert body["estimated_queue_wait_s"] == pytest.approx(3.0, abs=0.01) and body["kv_cache_usage"] == 0.75
    assert isinstance(body["timestamp"], float)


def test_load_report_has_signals_and_lifecycle() -> None:
    engine = _Engine()
    engine.stats = {"num_waiting": 2, "pending_work_text": 100}
    engine.draining = True
    engine.phase = "draining"
    report = LoadMonitor(engine, model_name="m").load_report()
    assert report["ready"] is False and report["draining"] is True and report["phase"] == "draining"
    assert report["num_waiting"] == 2 and report["pending_prefill_tokens"]["text"] == 100
    assert {"estimated_queue_wait_s", "desired_replicas", "current_replicas", "target_queue_wait_s",
            "kv_cache_usage", "work_per_s"} <= set(report)


def test_requests_being_rendered_or_in_the_pipe_count_as_waiting() -> None:
    engine = _Engine()
    engine.stats = {"num_waiting": 2, "num_running": 4, "slot_wait_steps": 10, "slot_cycle_steps": 40,
                    "max_num_seqs": 4}
    monitor = LoadMonitor(engine, model_name="m")
    quiet = monitor.signals()
    engine.num_unfinished = 8  # 4 running + 2 waiting + 2 the core has not taken in yet
    engine.num_rendering = 2
    busy = monitor.signals()
    assert (quiet.num_waiting, busy.num_waiting) == (2, 6)
    # Each unseen request takes a slot for one cycle: 4 x 40 / 4 more steps to wait.
    assert busy.slot_wait_s == pytest.approx(quiet.slot_wait_s * (10 + 40) / 10)
