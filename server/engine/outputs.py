"""The types that cross the scheduler → runner → scheduler → front-end boundaries.

Plain Python; no torch. Owners:
- `SchedulerOutput` (with `NewRequestData`, `CachedRequestData`): built by
  `Scheduler.schedule()`, consumed by `ModelRunner.execute()`. A request's static data is
  sent once, when it is (re)admitted; afterwards only diffs: new block ids and how many
  tokens it gets this step. The runner keeps its own copy of each running request's tokens
  and appends what it samples.
- `RunnerOutput`: built by the runner, consumed by `Scheduler.update()`.
- `EngineCoreOutput`: built by `Scheduler.update()`, consumed by the front-end
  (`AsyncEngine` → detokenizer).
- `RequestOutput`: one streamed item per request per step, after detokenization.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.multimodal.inputs import MultiModalItem


@dataclass
class NewRequestData:
    """A request the runner has no state for: newly admitted, or resumed after preemption."""

    req_id: str
    token_ids: list[int]  # prompt + outputs so far (outputs are non-empty only when resumed)
    num_prompt_tokens: int
    mm_items: list[MultiModalItem]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # before this step (prefix-cache hits: K/V already in the blocks)
    mrope_positions: np.ndarray | None = None  # [3, num_prompt_tokens]
    mrope_delta: int = 0
    # Cross-attention families: the request's cross K/V blocks (allocated once, at
    # admission; the runner fills them from the encoder rows this step) and the per-prompt-
    # token attended ranges (`ProcessedPrompt.cross_ranges`).
    cross_block_ids: list[int] = field(default_factory=list)
    cross_ranges: np.ndarray | None = None
    cross_row_positions: np.ndarray | None = None


@dataclass
class CachedRequestData:
    """Diffs for requests the runner already holds, index-aligned."""

    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)  # appended to the table
    num_computed_tokens: list[int] = field(default_factory=list)  # before this step's tokens


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    # req_id -> tokens to compute this step, from the request's num_computed_tokens on.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # req_id -> indices into the request's mm_items to run through the encoder this step.
    scheduled_encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    # Encoder outputs no scheduled request needs any more: the runner drops them.
    free_encoder_hashes: list[str] = field(default_factory=list)
    # Requests whose runner state must be dropped before this step's new requests are added.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first


@dataclass
class RunnerOutput:
    req_ids: list[str]  # every request of the step, in batch order
    # req_id -> tokens sampled this step; [] when the step ended mid-prefill.
    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    # Constrained requests whose grammar ended with this step's token: they stop here.
    grammar_finished: set[str] = field(default_factory=set)
    # Constrained requests whose grammar could not be compiled: they end with an error.
    grammar_failed: set[str] = field(default_factory=set)


EMPTY_RUNNER_OUTPUT = RunnerOutput(req_ids=[], sampled_token_ids={})


@dataclass
class EngineCoreOutput:
    req_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = 0
    new_logprobs: list[TokenLogprob] | None = None
    # On a request's first output only: when it was first scheduled (time.monotonic(), one
    # clock for every process of the host), for the queue / prefill time metrics.
    first_scheduled_time: float | None = None

    def __reduce__(self):
        # One per request per step through the engine pipe: as a positional tuple it pickles
        # smaller and loads faster than a dataclass's default (class + field-name dict).
        return (
            EngineCoreOutput,
            (self.req_id, self.new_token_ids, self.finish_reason, self.stop_reason, self.num_cached_tokens,
             self.new_logprobs, self.first_scheduled_time),
        )


@dataclass
class RequestOutput:
    """What the API layer receives for a request, once per step it advanced."""

    request_id: str
    text: str  # newly decoded text (a delta)
    token_ids: list[int]  # new token ids (a delta)
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    num_prompt_tokens: int
    num_output_tokens: int  # total so far
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None

    def merged_with(self, later: "RequestOutput") -> "RequestOutput":
        """This delta followed by `later` (the next one of the same request) as one delta."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = [*(self.logprobs or ()), *(later.logprobs or ())]
        return RequestOutput(
            request_id=self.request_id,
            text=self.text + later.text,
            token_ids=self.token_ids + later.token_ids,
            finished=later.finished,
            finish_reason=later.finish_reason,
            stop_reason=later.stop_reason,
            num_prompt_tokens=later.num_prompt_tokens,
            num_output_tokens=later.num_output_tokens,
            num_cached_tokens=max(self.num_cached_tokens, later.num_cached_tokens),
            logprobs=logprobs,
        )
