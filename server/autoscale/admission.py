"""Admission control: shed load with a 429 before latency explodes.

Decided on the request's arrival, before any media is fetched or decoded, from the latest
`LoadSignals`:
- `max_queue_wait_s` (--max-queue-wait-s): refuse when the estimated queue wait exceeds it;
  Retry-After is the estimate rounded up to whole seconds (at least 1).
- `max_waiting_requests` (--max-waiting-requests): refuse when that many requests already
  wait for the engine.

A 429 says "this replica is busy, retry later or elsewhere"; 503 stays for a replica that
cannot serve at all (loading, dead). Plain Python: the API layer turns a `Rejection` into
its error response.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlmserve.autoscale.signals import LoadSignals

# The reasons of vlmserve:admission_rejections_total (every one is exported from the start).
REASONS = ("queue_wait", "waiting_requests", "not_ready")


@dataclass(frozen=True)
class Rejection:
    reason: str  # one of REASONS
    status_code: int
    retry_after_s: int
    message: str


@dataclass(frozen=True)
class AdmissionPolicy:
    max_queue_wait_s: float | None = None  # None: no limit
    max_waiting_requests: int | None = None

    def __post_init__(self) -> None:
        if self.max_queue_wait_s is not None and not self.max_queue_wait_s > 0:
            raise ValueError(f"--max-queue-wait-s must be greater than 0, got {self.max_queue_wait_s}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"--max-waiting-requests must be at least 0, got {self.max_waiting_requests}")

    def decide(self, signals: LoadSignals) -> Rejection | None:
        """None: admit. A request is refused only for load it would join, not for its own size."""
        wait = signals.estimated_queue_wait_s
        retry = max(1, math.ceil(wait)) if math.isfinite(wait) else 60
        if self.max_waiting_requests is not None and signals.num_waiting >= self.max_waiting_requests:
            return Rejection(
                "waiting_requests", 429, retry,
                f"the server is overloaded: {signals.num_waiting} requests are waiting "
                f"(--max-waiting-requests {self.max_waiting_requests}); retry after {retry} s",
            )
        if self.max_queue_wait_s is not None and wait > self.max_queue_wait_s:
            return Rejection(
                "queue_wait", 429, retry,
                f"the server is overloaded: the estimated queue wait is {wait:.2f} s, over the "
                f"--max-queue-wait-s limit of {self.max_queue_wait_s:g} s; retry after {retry} s",
            )
        return None
