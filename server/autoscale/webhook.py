"""The scale webhook: tell an external scaler about a spike as it happens, not a scrape later.

`--scale-webhook URL` (repeatable) names receivers: a Knative / custom controller that adds
replicas, a pager, a chat hook. On *sustained* overload (the estimated queue wait above
--target-queue-wait-s for `sustain_s` seconds) each receives a POST with a JSON body

    {"event": "overload", "model": ..., "desired_replicas": 3, "current_replicas": 1,
     "num_waiting": 40, "num_running": 8, "estimated_queue_wait_s": 2.7,
     "target_queue_wait_s": 1.0, "kv_cache_usage": 0.62, "timestamp": 1733300000.1}

and, once the wait has stayed at or under the target for `sustain_s`, the same shape with
"event": "recovery". While the overload lasts, a repeat "overload" (with fresh figures) goes
out at most once per `cooldown_s` (--scale-webhook-cooldown-s); so does a new overload that
follows a recovery within the cooldown.

Delivery is off the event loop, on one sender thread: a timeout per attempt, a bounded number
of attempts with backoff, redirects not followed, failures logged and dropped (the next event
carries the current state anyway). The URLs are the operator's own configuration, so unlike
media URLs they are not held to the SSRF guard: loopback and private addresses are allowed
(a sidecar controller is the common case); only http and https are.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import httpx

logger = logging.getLogger(__name__)

SUSTAIN_S = 3.0


def check_webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--scale-webhook must be an http:// or https:// URL with a host, got {url!r}")
    return url


class OverloadDetector:
    """Pure state machine over (time, wait) samples; says which event to send, if any."""

    def __init__(self, target_s: float, sustain_s: float = SUSTAIN_S, cooldown_s: float = 30.0) -> None:
        if target_s <= 0 or sustain_s < 0 or cooldown_s < 0:
            raise ValueError("target must be positive, sustain and cooldown at least 0")
        self.target_s = target_s
        self.sustain_s = sustain_s
        self.cooldown_s = cooldown_s
        self.overloaded = False  # an "overload" went out and no "recovery" since
        self._over: bool | None = None  # the side of the target the last sample was on
        self._since = 0.0  # when the samples crossed to that side
        self._last_overload_sent: float | None = None

    def update(self, now: float, wait_s: float) -> str | None:
        """"overload", "recovery" or None for a sample taken at `now` (monotonic seconds)."""
        over = wait_s > self.target_s
        if over != self._over:
            self._over, self._since = over, now
        sustained = now - self._since >= self.sustain_s
        if over and sustained and self._cooled(now):
            self.overloaded = True
            self._last_overload_sent = now
            return "overload"
        if not over and sustained and self.overloaded:
            self.overloaded = False
            return "recovery"
        return None

    def _cooled(self, now: float) -> bool:
        return self._last_overload_sent is None or now - self._last_overload_sent >= self.cooldown_s


@dataclass(frozen=True)
class Delivery:
    url: str
    status_code: int | None  # None: no answer (timeout, refused)
    attempts: int


class WebhookSender:
    """POSTs events from a daemon thread. `send` never blocks (a bounded queue; when full,
    the event is dropped with a warning: a stuck receiver must not grow memory)."""

    def __init__(self, urls: list[str], *, timeout_s: float = 2.0, attempts: int = 3, backoff_s: float = 0.25,
                 on_delivery: Callable[[Delivery], None] | None = None) -> None:
        self.urls = [check_webhook_url(u) for u in urls]
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.on_delivery = on_delivery
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._run, name="scale-webhook", daemon=True)
        self._thread.start()

    def send(self, event: dict) -> None:
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            logger.warning("scale webhook: %d events queued, dropping %s", self._queue.qsize(), event.get("event"))

    def close(self, timeout: float = 2.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s, follow_redirects=False, trust_env=False) as client:
            while (event := self._queue.get()) is not None:
                for url in self.urls:
                    self._deliver(client, url, event)

    def _deliver(self, client: httpx.Client, url: str, event: dict) -> None:
        status = None
        for attempt in range(1, self.attempts + 1):
            try:
                status = client.post(url, json=event).status_code
            except httpx.HTTPError as e:
                status = None
                logger.warning("scale webhook %s: attempt %d failed: %s", url, attempt, e)
            if status is not None and status < 500 and status != 429:
                break  # delivered, or refused for good (4xx): retrying will not help
            if attempt < self.attempts:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        if status is None or status >= 300:
            logger.warning("scale webhook %s: %s event not accepted (status %s)", url, event.get("event"), status)
        if self.on_delivery is not None:
            self.on_delivery(Delivery(url, status, attempt))
