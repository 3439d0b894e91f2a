"""StepWatchdog: tells a step loop that is slow from one that is stuck.

The core publishes a `StepResult` after every step, so while requests are pending the
front-end hears from it at least once per step. Silence longer than `timeout_s` with work
pending means the loop is wedged (a hung kernel, a deadlocked collective, a stopped process)
even though its process is alive: `/health` must then fail, and in-flight requests must end
with an error rather than wait forever. Silence while idle is normal: the core publishes
nothing when there is nothing to do, so the clock restarts when work arrives.

Plain Python over timestamps (time.monotonic()); `AsyncEngine` owns it and polls `check`.
"""

from __future__ import annotations


class StepWatchdog:
    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"--engine-watchdog-s must be greater than 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._last = float("-inf")  # no work yet: nothing to wait for

    @property
    def poll_s(self) -> float:
        return min(1.0, self.timeout_s / 4)

    def progress(self, now: float) -> None:
        """A step result arrived, or work arrived at an idle loop."""
        self._last = now

    def check(self, now: float, num_pending: int) -> str | None:
        """The reason the engine is to be declared dead, or None."""
        silent = now - self._last
        if num_pending and silent > self.timeout_s:
            return (f"the engine step loop made no progress for {silent:.1f} s with {num_pending} request(s) "
                    f"pending (--engine-watchdog-s {self.timeout_s:g}); restart the server")
        return None
