"""EngineCore: the step loop. Schedule, run, update — one forward pass per step."""

from __future__ import annotations

from server.engine.outputs import EngineCoreOutput
from server.engine.request import Request, RequestStatus
from server.engine.scheduler import Scheduler
from server.runner.model_runner import ModelRunner


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        runner_output = self.runner.execute(scheduler_output)
        return self.scheduler.update(scheduler_output, runner_output)
