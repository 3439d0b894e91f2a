"""The continuous-batching scheduler (plain Python; no torch).

Owner: `EngineCore`, which calls `schedule()` → runner → `update()` once per step, and
`add_request` / `finish_requests` between steps.

Each step packs, under `max_num_batched_tokens` and `max_num_seqs`: first the running
requests, in admission order (decodes and the next chunks of partial prefills), then
waiting requests FCFS. A request's `num_computed_tokens` advances when it is scheduled;
`update` appends what the runner sampled. When a running request cannot get KV blocks, the
last admitted running request is preempted (recompute): it frees everything and returns to
the head of the waiting queue; no waiting request is admitted in a step that preempted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from vlmserve.config import EngineConfig
from vlmserve.engine.cross_kv_manager import CrossKVManager
from vlmserve.engine.encoder_cache_manager import EncoderCacheManager
from vlmserve.engine.kv_cache_manager import KVCacheManager
from vlmserve.engine.outputs import (
    CachedRequestData,
    EngineCoreOutput,
    NewRequestData,
    RunnerOutput,
    SchedulerOutput,
)
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


@dataclass
class _EncoderPlan:
    num_new_tokens: int
    to_encode: list[int] = field(default_factory=list)  # input ids to allocate and encode
    # Same image twice in one prompt: the later copy hits the entry the first allocates.
    deferred_hits: list[int] = field(default_factory=list)
    num_rows: int = 0


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
        self.num_preemptions = 0

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        n = request.num_prompt_tokens
        if n == 0:
            raise ValueError("the prompt is empty; send at least one token")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens but max_model_len is {self.max_model_len}: "
                "shorten the prompt or raise --max-model-len"
            )
        if n > self._kv_capacity_tokens:
            raise ValueError(
                f"the prompt has {n} tokens but the whole KV cache holds "
                f"{self._kv_capacity_tokens} ({self.kv_cache.num_blocks} blocks of "
                f"{self.block_size}): shorten the prompt or raise --kv-cache-memory-gb or --num-kv-blocks"
            )
        limit = min(self.config.encoder_cache_size, self.config.max_encoder_tokens_per_step)
        for item in request.mm_items:
            if item.encoder_rows > limit:
                raise ValueError(
                    f"an {item.modality} needs {item.encoder_rows} encoder rows but at most "
                    f"{limit} fit (encoder_cache_size={self.config.encoder_cache_size}, "
                    f"max_encoder_tokens_per_step={self.config.max_encoder_tokens_per_step}): "
                    "send a smaller image or raise --encoder-cache-size and --max-encoder-tokens-per-step"
                )
        if any(item.cross_attn_tokens for item in request.mm_items):
            if self.cross_kv is None:
                raise ValueError("this model has no cross-attention: its items must not carry cross_attn_tokens")
            if self.cross_kv.num_blocks_needed(request) > self.cross_kv.num_blocks:
                raise ValueError(
                    f"the images need {CrossKVManager.num_rows(request)} cross-attention rows but the cross "
                    f"K/V pool holds {self.cross_kv.num_blocks * self.block_size}: send fewer or smaller "
                    "images or raise --num-cross-kv-blocks"
                )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

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
        """The runner raised on this step. Its requests end with finish_reason "error", and
        nothing the step may have half-written is reused: their blocks lose their prefix-cache
        hashes, and the encoder outputs the step was to compute are forgotten. Requests the
        step did not touch go on. (Every holder of such an output was scheduled in this step,
        so all are freed before the discard.)"""
        to_encode = [
            self.requests[req_id].mm_items[i].content_hash
            for req_id, input_ids in scheduler_output.scheduled_encoder_inputs.items()
            if req_id in self.requests
            for i in input_ids
        ]
        outputs: list[EngineCoreOutput] = []
        failed = set()
        for req_id in scheduler_output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            request.status = RequestStatus.FINISHED_ERROR
            failed.add(req_id)
            self._free_request(request, uncache=True)
            outputs.append(EngineCoreOutput(req_id=req_id, new_token_ids=[], finish_reason=FINISH_REASONS[request.status]))
        self.running = [r for r in self.running if r.request_id not in failed]
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

        i = 0
        while i < len(self.running) and token_budget > 0:
            request = self.running[i]
            start = request.num_computed_tokens
            wanted = min(request.num_tokens - start, token_budget)
            plan = self._plan_encoder(request, start, wanted, encoder_budget)
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
            self._commit_encoder(request, plan, encoder_inputs)
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
            request = self.waiting[0]
            hit_blocks, num_hit = self.kv_cache.get_computed_blocks(request)
            wanted = min(request.num_tokens - num_hit, token_budget)
            needs_cross = self.cross_kv is not None and CrossKVManager.num_rows(request) > 0
            # A cross-attention request has every image encoded at admission: its cross K/V
            # is written once, before its first chunk runs.
            plan = self._plan_encoder(request, num_hit, wanted, encoder_budget, all_items=needs_cross)
            new_blocks = None
            if plan.num_new_tokens > 0 and (not needs_cross or self.cross_kv.can_allocate(request)):
                new_blocks = self.kv_cache.allocate_slots(request, plan.num_new_tokens, hit_blocks)
            if new_blocks is None:
                # Drop the refs planning took; the entries stay cached for the next try.
                for input_id in self.encoder_cache.held_input_ids(request):
                    self.encoder_cache.free_encoder_input(request, input_id)
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = request.num_cached_tokens = num_hit
            self._commit_encoder(request, plan, encoder_inputs)
            encoder_budget -= plan.num_rows
            token_budget -= plan.num_new_tokens
            num_scheduled[request.request_id] = plan.num_new_tokens
            cross_blocks = self.cross_kv.allocate(request) if needs_cross else []
            new_reqs.append(self._new_request_data(request, new_blocks, cross_blocks))

        for req_id, n in num_scheduled.items():
            self.requests[req_id].num_computed_tokens += n
        finished, self._finished_req_ids = self._finished_req_ids, set()
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
                )
            )
            if request.is_finished:
                finished.add(req_id)
                self._free_request(request)
        if finished:
            self.running = [r for r in self.running if r.request_id not in finished]
        return outputs

    def get_stats(self) -> SchedulerStats:
        pending_tokens = sum(r.num_tokens for r in self.waiting) + sum(
            max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in self.running
        )
        pending_rows = 0
        for request in (*self.waiting, *self.running):
            for item in request.mm_items:
                if item.offset + item.length > request.num_computed_tokens and not (
                    self.encoder_cache.contains(item.content_hash)
                ):
                    pending_rows += item.encoder_rows
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv_cache.usage,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.kv_cache.prefix_cache_queries,
            prefix_cache_hits=self.kv_cache.prefix_cache_hits,
            encoder_cache_queries=self.encoder_cache.queries,
            encoder_cache_hits=self.encoder_cache.hits,
            num_pending_prefill_tokens=pending_tokens,
            num_pending_encoder_rows=pending_rows,
        )

    # ---- internals -----------------------------------------------------------------------

    def _plan_encoder(
        self, request: Request, start: int, num_new_tokens: int, budget: int, all_items: bool = False
    ) -> _EncoderPlan:
        """Which items the chunk [start, start + num_new_tokens) needs encoded, shortening
        the chunk to end before the first item that cannot be encoded this step.

        Items already cached are referenced now (the request needs them either way); items
        wholly before `start` (prefix-cache hits, earlier chunks) are skipped."""
        plan = _EncoderPlan(num_new_tokens)
        end = start + num_new_tokens
        planned: set[str] = set()
        for i, item in enumerate(request.mm_items):
            if not all_items:
                if item.offset >= end:
                    break
                if item.offset + item.length <= start:
                    continue
            if item.content_hash in planned:
                plan.deferred_hits.append(i)
            elif self.encoder_cache.has_cache(request, i):
                pass
            elif self.encoder_cache.can_allocate(
                request, i, budget - plan.num_rows, num_reserved_rows=plan.num_rows
            ):
                plan.to_encode.append(i)
                plan.num_rows += item.encoder_rows
                planned.add(item.content_hash)
            else:
                # The chunk stops before the item; 0 tokens when it is already inside it, or
                # when every item must be encoded now.
                plan.num_new_tokens = 0 if all_items else max(0, item.offset - start)
                break
        return plan

    def _commit_encoder(
        self, request: Request, plan: _EncoderPlan, encoder_inputs: dict[str, list[int]]
    ) -> None:
        for i in plan.to_encode:
            self.encoder_cache.allocate(request, i)
        for i in plan.deferred_hits:
            self.encoder_cache.has_cache(request, i)
        if plan.to_encode:
            encoder_inputs[request.request_id] = list(plan.to_encode)

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

    def _preempt(self, request: Request) -> None:
        self.kv_cache.free(request)
        self.encoder_cache.free(request)
        if self.cross_kv is not None:
            self.cross_kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _free_request(self, request: Request, uncache: bool = False) -> None:
        self.kv_cache.free(request, uncache=uncache)
        self.encoder_cache.free(request)
        if self.cross_kv is not None:
            self.cross_kv.free(request)
        self._finished_req_ids.add(request.request_id)
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
