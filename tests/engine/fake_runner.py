"""A hand-built runner for engine tests without a model: what `EngineCore` calls on the runner.

It keeps what a real runner keeps (the requests it was sent, the encoder outputs it holds) and
checks the scheduler's side of the protocol against it. A broken promise is recorded in
`violations`, not raised: `EngineCore.step` would take an exception for a failed step.
"""

from __future__ import annotations

from collections.abc import Callable

from vlmserve.engine.outputs import RunnerOutput, SchedulerOutput
from vlmserve.engine.scheduler import Scheduler


def token_at(req_id: str, position: int) -> int:
    """The token the fake model samples for position `position` of a request: deterministic,
    so a recomputed request (preempted, retried) samples what it would have. Never 2 (EOS)."""
    return 10 + (sum(map(ord, req_id)) * 31 + position * 7) % 50


class FakeRunner:
    class encoder:
        num_encoded_items = 0

    def __init__(self, scheduler: Scheduler, fail_if: Callable[[SchedulerOutput], bool] | None = None) -> None:
        self.scheduler = scheduler
        self.fail_if = fail_if  # a step for which it returns True raises, after encoding
        self.num_executed = 0
        self.num_failed = 0
        self.known: dict[str, int] = {}  # req id -> num_computed_tokens the runner believes
        self.encoded: set[str] = set()  # content hashes of the encoder outputs it holds
        self.violations: list[str] = []

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        self.num_executed += 1
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self.known.pop(req_id, None)
        self.encoded -= set(out.free_encoder_hashes)
        for new in out.scheduled_new_reqs:
            if new.req_id in self.known:
                self.violations.append(f"{new.req_id} sent as new while the runner holds it")
            self.known[new.req_id] = new.num_computed_tokens
        cached = out.scheduled_cached_reqs
        for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens):
            if req_id not in self.known:
                self.violations.append(f"{req_id} sent as cached but the runner never got it")
            self.known[req_id] = computed
        requests = self.scheduler.requests
        for req_id, input_ids in out.scheduled_encoder_inputs.items():
            self.encoded |= {requests[req_id].mm_items[i].content_hash for i in input_ids}
        admitted = {new.req_id for new in out.scheduled_new_reqs}
        for req_id, n in out.num_scheduled_tokens.items():
            req = requests[req_id]
            start = self.known.get(req_id, 0)
            if start + n != req.num_computed_tokens:
                self.violations.append(f"{req_id}: runner at {start} + {n} != scheduler at {req.num_computed_tokens}")
            for item in req.mm_items:
                # Cross-attention items: all of them, when the request's cross K/V is written.
                needed = item.cross_attn_tokens > 0 and req_id in admitted or (
                    item.offset < start + n and item.offset + item.length > start)
                if needed and item.content_hash not in self.encoded:
                    self.violations.append(f"{req_id} needs encoder output {item.content_hash} it never got")
        if self.fail_if is not None and self.fail_if(out):
            self.num_failed += 1
            raise RuntimeError("simulated fault in a step")
        sampled = {}
        for req_id, n in out.num_scheduled_tokens.items():
            req = requests[req_id]
            self.known[req_id] += n
            done = req.num_computed_tokens == req.num_tokens
            sampled[req_id] = [token_at(req_id, req.num_tokens)] if done else []
        return RunnerOutput(req_ids=list(out.num_scheduled_tokens), sampled_token_ids=sampled)
