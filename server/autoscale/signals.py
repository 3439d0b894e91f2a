"""Load signals for autoscaling and admission: how long a request arriving now would wait.

Owner: `LoadMonitor` (`monitor.py`) feeds `ThroughputEstimator` one sample per engine step
(on the event loop, from the `StepResult` stats the engine core publishes) and builds a
`LoadSignals` from the latest scheduler stats whenever someone asks (/v1/load, /metrics,
admission, the scale webhook). Plain Python: no torch, no FastAPI.

The estimate, in seconds:

    estimated_queue_wait_s = pending_work / work_per_s  +  slot_wait_steps * step_s

- pending_work: prefill still to do for queued and running requests, in token-equivalents:
  language-model prompt tokens plus vision-encoder rows (an image's encoder rows cost about
  what as many prompt tokens do; one 1080p Qwen2-VL image is ~10k rows).
- work_per_s: measured throughput, the same units (LM tokens + encoder rows computed per
  second of the step loop's wall time), as a ratio of exponentially decayed sums, so old
  steps fade out.
  Before any measurement a prior stands in (`PRIOR_WORK_PER_S` over `PRIOR_SECONDS`); the
  prior decays like a measurement, so a few seconds of real steps outweigh it.
- slot_wait_steps: decode steps until a sequence slot (max_num_seqs) frees for a newcomer
  (the scheduler computes it from the running requests' output budgets; requests sent to the
  core after its last stats add a share of a slot cycle each), times the decayed mean step
  time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# Before any step was measured: a conservative rate for one accelerator (a small VLM prefills
# several thousand tokens per second), worth this many seconds of measured steps.
PRIOR_WORK_PER_S = 4096.0
PRIOR_STEP_S = 0.05
PRIOR_SECONDS = 1.0
# Step time after which a sample weighs half as much as a new one.
HALF_LIFE_S = 5.0


class ThroughputEstimator:
    """Decayed work/time and step-time averages. Not thread-safe: one owner (the event loop)."""

    def __init__(self, half_life_s: float = HALF_LIFE_S, prior_work_per_s: float = PRIOR_WORK_PER_S,
                 prior_step_s: float = PRIOR_STEP_S, prior_seconds: float = PRIOR_SECONDS) -> None:
        if half_life_s <= 0 or prior_work_per_s <= 0 or prior_step_s <= 0 or prior_seconds <= 0:
            raise ValueError("half-life, priors and prior weight must be positive")
        self.half_life_s = half_life_s
        # Invariant: _work / _time is the throughput; _time / _steps the mean step time.
        self._work = prior_work_per_s * prior_seconds
        self._time = prior_seconds
        self._steps = prior_seconds / prior_step_s
        self.num_samples = 0

    def observe(self, step_s: float, work: float) -> None:
        """One engine step that took `step_s` seconds and computed `work` token-equivalents.
        Decay is by step time, not wall time: an idle engine keeps its last estimate."""
        if step_s <= 0 or not math.isfinite(step_s):
            return
        keep = 0.5 ** (step_s / self.half_life_s)
        self._work = self._work * keep + max(0.0, work)
        self._time = self._time * keep + step_s
        self._steps = self._steps * keep + 1.0
        self.num_samples += 1

    @property
    def work_per_s(self) -> float:
        return self._work / self._time if self._work > 0 else PRIOR_WORK_PER_S

    @property
    def step_s(self) -> float:
        return self._time / self._steps


@dataclass(frozen=True)
class LoadSignals:
    """What /v1/load answers (besides the raw scheduler stats) and the gauges export."""

    estimated_queue_wait_s: float
    prefill_wait_s: float
    slot_wait_s: float
    pending_work: float  # token-equivalents: LM prompt tokens + encoder rows
    pending_prefill_tokens: dict[str, float]  # by modality: text, image, video
    work_per_s: float
    step_s: float
    num_waiting: int
    num_running: int
    kv_cache_usage: float
    target_queue_wait_s: float
    current_replicas: int
    desired_replicas: int

    def as_dict(self) -> dict:
        return asdict(self)


def desired_replicas(current: int, load_s: float, target_s: float) -> int:
    """ceil(current x load / target), at least 1: the HPA's formula on the estimated wait.
    A tiny epsilon keeps exact multiples (load == target) from rounding up."""
    if target_s <= 0:
        raise ValueError("target_queue_wait_s must be positive")
    return max(1, math.ceil(current * load_s / target_s - 1e-9))


def compute_signals(stats: dict[str, float], estimator: ThroughputEstimator, *, target_queue_wait_s: float,
                    current_replicas: int = 1, num_unfinished: int = 0) -> LoadSignals:
    """`stats`: the scheduler stats the core published last (see `SchedulerStats`).
    `num_unfinished`: requests the front-end handed the engine or is rendering for it; those the
    core has not taken in yet count as waiting."""
    by_modality = {
        "text": float(stats.get("pending_work_text", stats.get("num_pending_prefill_tokens", 0))),
        "image": float(stats.get("pending_work_image", 0)),
        "video": float(stats.get("pending_work_video", 0)),
    }
    work = sum(by_modality.values())
    prefill_wait = work / estimator.work_per_s
    running = int(stats.get("num_running", 0))
    known_waiting = int(stats.get("num_waiting", 0))
    # Sent to the core after its last stats (in the pipe): each takes a slot for one cycle.
    unseen = max(0, num_unfinished - running - known_waiting)
    slot_steps = float(stats.get("slot_wait_steps", 0))
    if unseen and running + known_waiting + unseen >= stats.get("max_num_seqs", 1):
        slot_steps += unseen * float(stats.get("slot_cycle_steps", 0)) / max(1, int(stats.get("max_num_seqs", 1)))
    slot_wait = slot_steps * estimator.step_s
    wait = prefill_wait + slot_wait
    waiting = known_waiting + unseen
    return LoadSignals(
        estimated_queue_wait_s=wait,
        prefill_wait_s=prefill_wait,
        slot_wait_s=slot_wait,
        pending_work=work,
        pending_prefill_tokens=by_modality,
        work_per_s=estimator.work_per_s,
        step_s=estimator.step_s,
        num_waiting=waiting,
        num_running=running,
        kv_cache_usage=float(stats.get("kv_cache_usage", 0.0)),
        target_queue_wait_s=target_queue_wait_s,
        current_replicas=current_replicas,
        desired_replicas=desired_replicas(current_replicas, wait, target_queue_wait_s),
    )
