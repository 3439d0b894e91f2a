"""EngineCore: the step loop. Schedule, run, update — one forward pass per step.

A step whose forward pass raises fails only the requests it ran (finish_reason "error"); the
engine goes on with the rest. Several failing steps in a row mean the engine itself is
broken (a lost device, say): the error then propagates and the engine is reported dead."""

from __future__ import annotations

import logging

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

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)
        spec = request.sampling_params.structured
        if spec is not None and self.runner.grammar is not None:
            # Compiles on the grammar thread while the request queues and prefills.
            self.runner.grammar.prepare(spec)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
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
