"""EngineCore: the step loop. Schedule, run, update — one forward pass per step.

A step whose forward pass raises fails only the requests it ran (finish_reason "error"); the
engine goes on with the rest. Several failing steps in a row mean the engine itself is
broken (a lost device, say): the error then propagates and the engine is reported dead."""

from __future__ import annotations

import logging
import time

from vlmserve.engine.outputs import EngineCoreOutput
from vlmserve.engine.request import Request, RequestStatus
from vlmserve.engine.scheduler import Scheduler
from vlmserve.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Failed steps in a row after which the engine gives up.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.num_failed_steps = 0
        self._failures_in_a_row = 0
        # The last step's wall time (schedule + forward + update), LM tokens and encoder rows
        # computed: the front-end's throughput estimate and step metrics read them.
        self.last_step_s = 0.0
        self.last_step_tokens = 0
        self.last_step_encoder_rows = 0
        # Wall time from the previous step's end to this one's, when the loop went straight
        # on (work was left): the step plus the loop's own costs (inputs, publishing); the
        # step time alone otherwise. What a queued request really waits per step.
        self.last_cycle_s = 0.0
        self._prev_end: float | None = None
        self._went_on = False

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        t0 = time.perf_counter()
        outputs = self._step()
        t1 = time.perf_counter()
        self.last_step_s = t1 - t0
        went_on = self._went_on and self._prev_end is not None
        self.last_cycle_s = t1 - self._prev_end if went_on else self.last_step_s
        self._prev_end, self._went_on = t1, self.scheduler.has_unfinished_requests()
        return outputs

    def _step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        self.last_step_tokens = scheduler_output.total_num_scheduled_tokens
        self.last_step_encoder_rows = sum(
            self.scheduler.requests[req_id].mm_items[i].encoder_rows
            for req_id, ids in scheduler_output.scheduled_encoder_inputs.items()
            if req_id in self.scheduler.requests
            for i in ids
        )
        try:
            runner_output = self.runner.execute(scheduler_output)
        except Exception:
            self._failures_in_a_row += 1
            if self._failures_in_a_row >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            self.num_failed_steps += 1
            failed = self.scheduler.fail_step(scheduler_output)
            logger.exception("an engine step failed; its %d request(s) end with an error: %s",
                             len(failed), ", ".join(out.req_id for out in failed))
            return failed
        self._failures_in_a_row = 0
        return self.scheduler.update(scheduler_output, runner_output)
