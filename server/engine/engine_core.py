"""EngineCore: the step loop. Schedule, run, update — one forward pass per step.

A step whose forward pass raises fails only its culprit: its requests are retried in halves
until the one that fails runs alone and ends with finish_reason "error" (`Scheduler.fail_step`);
the others finish with their normal outputs, and requests the step did not run go on. Several
steps in a row that fail with a single request (or none) mean the engine itself is broken (a
lost device, say): the error then propagates and the engine is reported dead."""

from __future__ import annotations

import logging
import time

from vlmserve.engine.outputs import EngineCoreOutput
from vlmserve.engine.request import Request, RequestStatus
from vlmserve.engine.scheduler import Scheduler
from vlmserve.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Failed steps in a row that each blamed one request (or had none to blame) after which the
# engine gives up. Steps failing while a culprit is searched for do not count.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.num_failed_steps = 0
        self._failures_in_a_row = 0
        # Whether the last step changed anything (scheduled tokens or preempted requests):
        # the step loop sleeps on its inputs after one that did not, instead of spinning.
        self.last_step_progressed = False
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
        spec = request.sampling_params.structured
        if spec is not None and self.runner.grammar is None:
            raise ValueError(
                "structured outputs (response_format json_object / json_schema, structured_outputs, and tools "
                "with tool_choice required or a named function) are not available with --tensor-parallel-size "
                "above 1 yet; serve with --tensor-parallel-size 1 for them"
            )
        self.scheduler.add_request(request)
        if spec is not None and self.runner.grammar is not None:
            # Compiles on the grammar thread while the request queues and prefills.
            self.runner.grammar.prepare(spec)

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
        self.last_step_progressed = bool(
            scheduler_output.total_num_scheduled_tokens or scheduler_output.preempted_req_ids
        )
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
            self.num_failed_steps += 1
            failed = self.scheduler.fail_step(scheduler_output)
            if failed or len(scheduler_output.num_scheduled_tokens) <= 1:
                self._failures_in_a_row += 1
                if self._failures_in_a_row >= MAX_CONSECUTIVE_STEP_FAILURES:
                    raise
            if failed:
                logger.exception("an engine step failed; its culprit ends with an error: %s",
                                 ", ".join(out.req_id for out in failed))
            else:
                logger.exception("an engine step with %d requests failed; retrying them in halves to find "
                                 "the culprit", len(scheduler_output.num_scheduled_tokens))
            return failed
        self._failures_in_a_row = 0
        return self.scheduler.update(scheduler_output, runner_output)
