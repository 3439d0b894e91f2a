"""Arrival times of an open-loop run: a Poisson process whose rate follows the scenario's
profile (steady, a spike of x factor over a window, or a linear ramp), drawn by thinning so
the times are exact for any rate(t). Times are seconds from the run's start."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    kind: str  # "steady" | "spike" | "ramp"
    rate: float  # requests/s (the base rate)
    duration: float
    spike_factor: float = 10.0
    spike_start: float = 0.0
    spike_length: float = 0.0
    ramp_to: float = 0.0

    def rate_at(self, t: float) -> float:
        if self.kind == "spike" and self.spike_start <= t < self.spike_start + self.spike_length:
            return self.rate * self.spike_factor
        if self.kind == "ramp":
            return self.rate + (self.ramp_to - self.rate) * (t / self.duration)
        return self.rate

    def peak(self) -> float:
        if self.kind == "spike":
            return self.rate * max(self.spike_factor, 1.0)
        if self.kind == "ramp":
            return max(self.rate, self.ramp_to)
        return self.rate

    def spike_window(self) -> tuple[float, float] | None:
        if self.kind != "spike":
            return None
        return self.spike_start, min(self.spike_start + self.spike_length, self.duration)


def arrival_times(profile: Profile, seed: int) -> list[float]:
    """Thinning (Lewis-Shedler): candidates at the peak rate, each kept with rate(t)/peak."""
    rng = random.Random(seed)
    peak = profile.peak()
    if peak <= 0:
        return []
    out, t = [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= profile.duration:
            return out
        if rng.random() * peak < profile.rate_at(t):
            out.append(t)
