"""The continuous-batching scheduler (plain Python; no torch).

Owner: `EngineCore`, which calls `schedule()` → runner → `update()` once per step, and
`add_request` / `finish_requests` between steps.

Each step packs, under `max_num_batched_tokens` and `max_num_seqs`: first the running
requests, in admission order (decodes and the next chunks of partial prefills), then
waiting requests FCFS. A request's `num_computed_tokens` advances when it is scheduled;
`update` appends what the runner sampled. When a running request cannot get KV blocks, the
last admitted running request is preempted (recompute): it frees everything and returns to
the head of the waiting queue; no waiting request is admitted in a step that preempted.

Never raises on an admitted request: what could never be scheduled is refused by `add_request`
(`admission.py`). After a failed step (`fail_step`), the step's requests are retried in halves,
one group alone per step, until the culprit is isolated (`culprit_search.py`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from vlmserve.config import EngineConfig
from vlmserve.engine.admission import check_admissible
from vlmserve.engine.cross_kv_manager import CrossKVManager
from vlmserve.engine.culprit_search import CulpritSearch
from vlmserve.engine.encoder_cache_manager import EncoderCacheManager
from vlmserve.engine.encoder_plan import commit_encoder, plan_encoder
from vlmserve.engine.kv_cache_manager import KVCacheManager
from vlmserve.engine.load_stats import slot_cycle_steps, slot_wait_steps
from vlmserve.engine.outputs import (
    CachedRequestData,
    EngineCoreOutput,
    NewRequestData,
    RunnerOutput,
    SchedulerOutput,
)
from vlmserve.engine.pending_work import PendingWork
from vlmserve.engine.request import FINISH_REASONS, Request, RequestStatus


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks held by requests
    num_preemptions: int  # total since start
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    encoder_cache_queries: int  # items
    encoder_cache_hits: int  # items
    num_pending_prefill_tokens: int  # tokens of waiting + running requests not yet computed
    num_pending_encoder_rows: int  # encoder rows still to compute for those requests
    # The same pending prefill work split by the modality that causes it (token-equivalents:
    # LM prompt tokens at text / image / video positions, plus that modality's encoder rows);
    # the three sum to num_pending_prefill_tokens + num_pending_encoder_rows.
    pending_work_text: int = 0
    pending_work_image: int = 0
    pending_work_video: int = 0
    # Decode steps until a request arriving now could get a sequence slot (max_num_seqs),
    # from the output budgets (max_tokens) left to the running requests: an upper bound.
    slot_wait_steps: int = 0
    # Steps one sequence slot stays taken, on average (the mean output budget): the front-end
    # adds slot_cycle_steps / max_num_seqs per request it sent that is not in these stats yet.
    slot_cycle_steps: float = 0.0
    max_num_seqs: int = 1


class Scheduler:
    def __init__(
        self, config: EngineConfig, num_kv_blocks: int, max_model_len: int, num_cross_kv_blocks: int = 0
    ) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        self.kv_cache = KVCacheManager(config.block_size, num_kv_blocks, config.enable_prefix_caching)
        # Cross-attention families only: per-request cross K/V blocks, taken at admission.
        self.cross_kv = CrossKVManager(config.block_size, num_cross_kv_blocks) if num_cross_kv_blocks else None
        self.encoder_cache = EncoderCacheManager(config.encoder_cache_size)
        # The pool's capacity bounds one request: it must be able to run alone.
        self._kv_capacity_tokens = num_kv_blocks * config.block_size
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_req_ids: set[str] = set()  # reported in the next SchedulerOutput
        self._preempted_req_ids: set[str] = set()  # by a failed step; reported likewise
        self.num_preemptions = 0
        self.culprits = CulpritSearch()
        # get_stats' pending prefill tokens / encoder rows, kept as counters (not recounted).
        self._pending = PendingWork(self.encoder_cache.contains)
        self.encoder_cache.on_change = self._pending.cache_changed

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        check_admissible(request, self.config, self.max_model_len, self.kv_cache.num_blocks, self.cross_kv)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self._pending.waiting(request)

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Ends requests from outside the step (abort, client gone): frees everything; the
        ids reach the runner in the next output's `finished_req_ids`."""
        if not status.finished:
            raise ValueError(f"finish_requests needs a finished status, got {status.name}")
        ids = [req_ids] if isinstance(req_ids, str) else list(req_ids)
        for req_id in ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free_request(request)

    def fail_step(self, scheduler_output: SchedulerOutput) -> list[EngineCoreOutput]:
        """The runner raised on this step. Alone in it, a request is the culprit: it ends with
        finish_reason "error". With others, nobody is blamed yet: all are preempted and retried
        in halves (`CulpritSearch`) until the one that fails is alone. Returns the culprits'
        outputs ([] while the search goes on).

        Nothing the step may have half-written is reused: the requests' blocks lose their
        prefix-cache hashes, and the encoder outputs the step was to compute are forgotten.
        (Every holder of such an output was scheduled in this step, so all are freed first.)
        Requests the step did not touch go on."""
        to_encode = [
            self.requests[req_id].mm_items[i].content_hash
            for req_id, input_ids in scheduler_output.scheduled_encoder_inputs.items()
            if req_id in self.requests
            for i in input_ids
        ]
        suspects = [
            self.requests[req_id]
            for req_id in scheduler_output.num_scheduled_tokens
            if req_id in self.requests and self.requests[req_id].status == RequestStatus.RUNNING
        ]
        outputs: list[EngineCoreOutput] = []
        if len(suspects) == 1:
            (request,) = suspects
            self.running.remove(request)
            request.status = RequestStatus.FINISHED_ERROR
            self._free_request(request, uncache=True)
            outputs.append(EngineCoreOutput(req_id=request.request_id, new_token_ids=[],
                                            finish_reason=FINISH_REASONS[request.status]))
        elif suspects:
            self.culprits.split(suspects)  # reads how far each got, before the preemption
            for request in reversed(suspects):  # back at the head of the queue, in order
                self.running.remove(request)
                self._preempt(request, uncache=True)
                self._preempted_req_ids.add(request.request_id)
        for content_hash in to_encode:
            self.encoder_cache.discard(content_hash)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        token_budget = self.config.max_num_batched_tokens
        encoder_budget = self.config.max_encoder_tokens_per_step
        num_scheduled: dict[str, int] = {}
        encoder_inputs: dict[str, list[int]] = {}
        cached = CachedRequestData()
        new_reqs: list[NewRequestData] = []
        preempted: set[str] = set()
        # While a failed step's culprit is searched for, one group of its requests runs alone.
        group = self.culprits.current_group(self.requests)

        i = 0
        while i < len(self.running) and token_budget > 0:
            request = self.running[i]
            if group is not None and request.request_id not in group:
                i += 1
                continue
            start = request.num_computed_tokens
            wanted = min(request.num_tokens - start, token_budget)
            plan = plan_encoder(self.encoder_cache, request, start, wanted, encoder_budget)
            if plan.num_new_tokens == 0:
                i += 1
                continue
            while True:
                new_blocks = self.kv_cache.allocate_slots(request, plan.num_new_tokens)
                if new_blocks is not None:
                    break
                victim = self.running.pop()
                self._preempt(victim)
                preempted.add(victim.request_id)
                if victim is request:
                    break
            if new_blocks is None:
                break  # the request preempted itself: nothing after it is left to schedule
            commit_encoder(self.encoder_cache, request, plan, encoder_inputs)
            encoder_budget -= plan.num_rows
            token_budget -= plan.num_new_tokens
            num_scheduled[request.request_id] = plan.num_new_tokens
            cached.req_ids.append(request.request_id)
            cached.new_block_ids.append(new_blocks)
            cached.num_computed_tokens.append(start)
            i += 1

        while (
            not preempted
            and self.waiting
            and token_budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0] if group is None else self._first_waiting_in(group)
            if request is None:
                break
            hit_blocks, num_hit = self.kv_cache.get_computed_blocks(request)
            wanted = min(request.num_tokens - num_hit, token_budget)
            needs_cross = self.cross_kv is not None and CrossKVManager.num_rows(request) > 0
            # A cross-attention request has every image encoded at admission: its cross K/V
            # is written once, before its first chunk runs.
            plan = plan_encoder(self.encoder_cache, request, num_hit, wanted, encoder_budget, all_items=needs_cross)
            new_blocks = None
            if plan.num_new_tokens > 0 and (not needs_cross or self.cross_kv.can_allocate(request)):
                new_blocks = self.kv_cache.allocate_slots(request, plan.num_new_tokens, hit_blocks)
            if new_blocks is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.remove(request)  # the head, but during a culprit search
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = request.num_cached_tokens = num_hit
            commit_encoder(self.encoder_cache, request, plan, encoder_inputs)
            encoder_budget -= plan.num_rows
            token_budget -= plan.num_new_tokens
            num_scheduled[request.request_id] = plan.num_new_tokens
            cross_blocks = self.cross_kv.allocate(request) if needs_cross else []
            new_reqs.append(self._new_request_data(request, new_blocks, cross_blocks))

        if group is not None and not num_scheduled:
            # The group cannot run beside the requests it paused (they hold the KV blocks or
            # encoder rows it needs): preempt one of those per step until it can.
            paused = [r for r in self.running if r.request_id not in group]
            if paused:
                self.running.remove(paused[-1])
                self._preempt(paused[-1])
                preempted.add(paused[-1].request_id)
        for req_id, n in num_scheduled.items():
            self.requests[req_id].num_computed_tokens += n
            self._pending.running(self.requests[req_id])
        finished, self._finished_req_ids = self._finished_req_ids, set()
        preempted |= self._preempted_req_ids
        self._preempted_req_ids = set()
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_encoder_inputs=encoder_inputs,
            free_encoder_hashes=self.encoder_cache.get_freed_hashes(),
            finished_req_ids=finished,
            preempted_req_ids=preempted,
        )

    def update(
        self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        finished: set[str] = set()
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted (or preempted) after this step was scheduled
            self._free_passed_encoder_inputs(request)
            sampled = runner_output.sampled_token_ids.get(req_id)
            # Mid-prefill the runner samples nothing (and anything it did sample is dropped).
            if not sampled or request.num_computed_tokens < request.num_tokens:
                continue
            first = request.num_output_tokens == 0
            new_tokens: list[int] = []
            for token in sampled:
                request.output_token_ids.append(token)
                new_tokens.append(token)
                if self._check_stop(request, token):
                    break
            if req_id in runner_output.grammar_failed:
                request.status = RequestStatus.FINISHED_ERROR
            elif not request.is_finished and req_id in runner_output.grammar_finished:
                request.status = RequestStatus.FINISHED_STOPPED  # the grammar allows nothing more
            logprobs = runner_output.logprobs.get(req_id)
            outputs.append(
                EngineCoreOutput(
                    req_id=req_id,
                    new_token_ids=new_tokens,
                    finish_reason=FINISH_REASONS.get(request.status),
                    stop_reason=request.stop_token_id,
                    num_cached_tokens=request.num_cached_tokens if first else 0,
                    new_logprobs=logprobs[: len(new_tokens)] if logprobs is not None else None,
                    first_scheduled_time=request.first_scheduled_time if first else None,
                )
            )
            if request.is_finished:
                finished.add(req_id)
                self._free_request(request)
        if finished:
            self.running = [r for r in self.running if r.request_id not in finished]
        return outputs

    def get_stats(self) -> SchedulerStats:
        """O(running): the pending-work figures are counters (`PendingWork`)."""
        p = self._pending
        text, image, video = p.work_by_modality()
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache.usage,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.kv_cache.prefix_cache_queries,
            prefix_cache_hits=self.kv_cache.prefix_cache_hits,
            encoder_cache_queries=self.encoder_cache.queries,
            encoder_cache_hits=self.encoder_cache.hits,
            num_pending_prefill_tokens=p.prefill_tokens,
            num_pending_encoder_rows=p.encoder_rows,
            pending_work_text=text,
            pending_work_image=image,
            pending_work_video=video,
            slot_wait_steps=slot_wait_steps(len(self.waiting), p.waiting_budget, self.running, self.config.max_num_seqs),
            slot_cycle_steps=slot_cycle_steps(p.total_budget, p.num_tracked),
            max_num_seqs=self.config.max_num_seqs,
        )

    # ---- internals -----------------------------------------------------------------------

    def _free_passed_encoder_inputs(self, request: Request) -> None:
        for i in self.encoder_cache.held_input_ids(request):
            item = request.mm_items[i]
            if item.offset + item.length <= request.num_computed_tokens:
                self.encoder_cache.free_encoder_input(request, i)

    def _check_stop(self, request: Request, token: int) -> bool:
        """Sets the finished status after `token` was appended; True if it finished.
        Below min_tokens neither eos nor stop token ids end the request (as in vLLM)."""
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                return True
            if token in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_token_id = token
                return True
        # One more token would need a KV slot past the pool's capacity: stop by length too.
        if (
            request.num_output_tokens >= params.max_tokens
            or request.num_tokens >= self.max_model_len
            or request.num_tokens > self._kv_capacity_tokens
        ):
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def _first_waiting_in(self, group: frozenset[str]) -> Request | None:
        return next((r for r in self.waiting if r.request_id in group), None)

    def _preempt(self, request: Request, uncache: bool = False) -> None:
        self.kv_cache.free(request, uncache=uncache)
        self.encoder_cache.free(request)
        if self.cross_kv is not None:
            self.cross_kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self._pending.waiting(request)

    def _free_request(self, request: Request, uncache: bool = False) -> None:
        self.kv_cache.free(request, uncache=uncache)
        self.encoder_cache.free(request)
        if self.cross_kv is not None:
            self.cross_kv.free(request)
        self._finished_req_ids.add(request.request_id)
        self.culprits.forget(request.request_id)
        self._pending.leave(request)
        del self.requests[request.request_id]

    def _new_request_data(
        self, request: Request, block_ids: list[int], cross_block_ids: list[int]
    ) -> NewRequestData:
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        return NewRequestData(
            req_id=request.request_id,
            token_ids=request.all_token_ids,
            num_prompt_tokens=request.num_prompt_tokens,
            mm_items=request.mm_items,
            sampling_params=request.sampling_params,
            block_ids=list(block_ids),
            num_computed_tokens=request.num_computed_tokens,
            mrope_positions=request.prompt.mrope_positions,
            mrope_delta=request.prompt.mrope_delta,
            cross_block_ids=list(cross_block_ids),
            cross_ranges=request.prompt.cross_ranges,
            cross_row_positions=request.prompt.cross_row_positions,
        )
