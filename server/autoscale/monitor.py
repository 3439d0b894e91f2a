"""LoadMonitor: the one object that turns the engine's step stats into load signals, admission
decisions, gauges and scale-webhook events.

Owner: `create_app` builds it over the engine and puts it on `app.state.load_monitor`;
`run_server` starts its ticker (`run`), which feeds the overload detector a sample every
`tick_s` and hands events to the webhook sender. All on the event loop except the sender's
HTTP calls. The engine is read through what `AsyncEngine` offers (`snapshot()`,
`num_unfinished`, `step_observers`, `metrics.registry`); an engine without them (the API
tests' fake) gets a monitor that sees an idle engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from vlmserve.autoscale.admission import REASONS, AdmissionPolicy, Rejection
from vlmserve.autoscale.signals import LoadSignals, ThroughputEstimator, compute_signals
from vlmserve.autoscale.webhook import OverloadDetector, WebhookSender

logger = logging.getLogger(__name__)


class _SignalsCollector:
    def __init__(self, monitor: "LoadMonitor") -> None:
        self.monitor = monitor

    def collect(self):
        sig = self.monitor.signals()
        name = [self.monitor.model_name]
        wait = GaugeMetricFamily("vlmserve:estimated_queue_wait_seconds",
                                 "Estimated wait of a request arriving now: pending prefill work (text tokens "
                                 "+ vision encoder rows) over measured throughput, plus the wait for a sequence slot.",
                                 labels=["model_name"])
        wait.add_metric(name, sig.estimated_queue_wait_s)
        yield wait
        desired = GaugeMetricFamily("vlmserve:desired_replicas",
                                    "ceil(current_replicas x estimated_queue_wait / target_queue_wait), from this "
                                    "replica's view (current_replicas 1).", labels=["model_name"])
        desired.add_metric(name, sig.desired_replicas)
        yield desired
        target = GaugeMetricFamily("vlmserve:target_queue_wait_seconds", "--target-queue-wait-s.",
                                   labels=["model_name"])
        target.add_metric(name, sig.target_queue_wait_s)
        yield target
        throughput = GaugeMetricFamily("vlmserve:prefill_throughput_tokens_per_second",
                                       "Measured work rate (LM tokens + encoder rows per second of step time), decayed.",
                                       labels=["model_name"])
        throughput.add_metric(name, sig.work_per_s)
        yield throughput
        ready = GaugeMetricFamily("vlmserve:ready", "1 while /ready answers 200.", labels=["model_name"])
        ready.add_metric(name, 1.0 if self.monitor.is_ready() else 0.0)
        yield ready


class LoadMonitor:
    def __init__(self, engine: Any, *, model_name: str, target_queue_wait_s: float = 1.0,
                 policy: AdmissionPolicy | None = None, webhooks: tuple[str, ...] = (),
                 webhook_cooldown_s: float = 30.0, webhook_sustain_s: float = 3.0, tick_s: float = 0.25) -> None:
        self.engine = engine
        self.model_name = model_name
        self.target_queue_wait_s = target_queue_wait_s
        self.policy = policy or AdmissionPolicy()
        self.estimator = ThroughputEstimator()
        self.tick_s = tick_s
        self._last_steps: float | None = None
        # Its own registry (/metrics serves the engine's and this one): an engine may be put
        # behind more than one app (tests) without registering a collector twice.
        self.registry = CollectorRegistry()
        self._rejections = Counter("vlmserve:admission_rejections", "Requests refused on arrival, by reason.",
                                   ["model_name", "reason"], registry=self.registry)
        for reason in REASONS:
            self._rejections.labels(model_name, reason)
        self.registry.register(_SignalsCollector(self))
        observers = getattr(engine, "step_observers", None)
        if observers is not None:
            observers.append(self.observe_step)
        self.detector = OverloadDetector(target_queue_wait_s, webhook_sustain_s, webhook_cooldown_s)
        self.sender = WebhookSender(list(webhooks)) if webhooks else None
        self.events_sent: list[dict] = []  # what the ticker handed the sender (for /v1/load)

    # ---- inputs -------------------------------------------------------------------------
    def observe_step(self, stats: dict[str, float]) -> None:
        steps = stats.get("steps", 0)
        if steps == self._last_steps:
            return  # inputs applied to an idle core: no step ran
        self._last_steps = steps
        cycle = stats.get("step_cycle_s", stats.get("step_s", 0.0))  # wall time per step, loop costs included
        self.estimator.observe(cycle, stats.get("step_tokens", 0) + stats.get("step_encoder_rows", 0))

    # ---- outputs ------------------------------------------------------------------------
    def signals(self) -> LoadSignals:
        snapshot = getattr(self.engine, "snapshot", None)
        stats = snapshot() if snapshot is not None else {}
        return compute_signals(stats, self.estimator, target_queue_wait_s=self.target_queue_wait_s,
                               num_unfinished=getattr(self.engine, "num_unfinished", 0)
                               + getattr(self.engine, "num_rendering", 0))

    def is_ready(self) -> bool:
        return bool(getattr(self.engine, "is_ready", self.engine.is_healthy)())

    def admit(self) -> Rejection | None:
        """None, or why a request arriving now is refused (counted)."""
        rejection = self.policy.decide(self.signals())
        if rejection is not None:
            self.count_rejection(rejection.reason)
        return rejection

    def count_rejection(self, reason: str) -> None:
        self._rejections.labels(self.model_name, reason).inc()

    def load_report(self) -> dict:
        """/v1/load: the engine's raw stats, the signals, and the lifecycle."""
        snapshot = getattr(self.engine, "snapshot", None)
        report: dict = dict(snapshot()) if snapshot is not None else {}
        report.update(self.signals().as_dict())
        report["ready"] = self.is_ready()
        report["draining"] = bool(getattr(self.engine, "draining", False))
        report["phase"] = getattr(self.engine, "phase", "serving")
        report["overloaded"] = self.detector.overloaded
        return report

    # ---- the ticker ---------------------------------------------------------------------
    def event(self, kind: str, sig: LoadSignals) -> dict:
        return {
            "event": kind,
            "model": self.model_name,
            "desired_replicas": sig.desired_replicas,
            "current_replicas": sig.current_replicas,
            "num_waiting": sig.num_waiting,
            "num_running": sig.num_running,
            "estimated_queue_wait_s": round(sig.estimated_queue_wait_s, 3),
            "target_queue_wait_s": sig.target_queue_wait_s,
            "kv_cache_usage": round(sig.kv_cache_usage, 4),
            "timestamp": time.time(),
        }

    def tick(self, now: float) -> dict | None:
        """One detector sample; the event handed to the sender, if any."""
        sig = self.signals()
        kind = self.detector.update(now, sig.estimated_queue_wait_s)
        if kind is None:
            return None
        event = self.event(kind, sig)
        logger.warning("scale %s: estimated queue wait %.2f s (target %.2f s), desired replicas %d",
                       kind, sig.estimated_queue_wait_s, sig.target_queue_wait_s, sig.desired_replicas)
        self.events_sent.append(event)
        del self.events_sent[:-16]
        if self.sender is not None:
            self.sender.send(event)
        return event

    async def run(self) -> None:
        """Until cancelled. Errors of one tick are logged; the ticker goes on."""
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.tick(time.monotonic())
            except Exception:
                logger.exception("load monitor tick failed")

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
