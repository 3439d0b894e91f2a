"""AsyncEngine: the EngineClient the API layer talks to.

Where the work runs: the EngineCore step loop behind a `CoreClient` (`core_client.py`): in
its own process (`ProcessCoreClient`, the server's default) or on a thread of this one
(`ThreadCoreClient`). Chat rendering (template, tokenizer, image processing) runs in a worker
pool. The event loop only queues requests, detokenizes (a few tokens per step) and hands
outputs to the per-request streams.

Cross-thread traffic: `CoreClient.add_request` / `abort_requests` (event loop → core) and
`loop.call_soon_threadsafe` from the client's thread (core → event loop: one `StepResult`
per step, or the engine's death).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from PIL import Image

from vlmserve.engine.client import EngineDeadError, RequestRejected
from vlmserve.engine.core_client import CoreClient, StepResult
from vlmserve.engine.detokenizer import IncrementalDetokenizer, text_token_ids
from vlmserve.engine.metrics import EngineMetrics
from vlmserve.engine.outputs import EngineCoreOutput, RequestOutput
from vlmserve.engine.request import Request
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.multimodal.inputs import ProcessedPrompt

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    request_id: str
    prompt: ProcessedPrompt
    detok: IncrementalDetokenizer
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    num_output_tokens: int = 0
    finished: bool = False
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None


class AsyncEngine:
    def __init__(
        self,
        core: CoreClient,
        processor: Any,
        *,
        model_name: str,
        render_workers: int = 4,
    ) -> None:
        """`core` is not started yet: `start()` starts it and learns the context length."""
        self.core = core
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_name = model_name
        self.max_model_len = 0  # set by start(): the core knows it once the model is loaded
        self.num_kv_blocks = 0
        self.eos_token_ids = frozenset(processor.eos_token_ids)
        self._render_pool = ThreadPoolExecutor(max_workers=render_workers, thread_name_prefix="render")
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._dead: str | None = None
        self._draining = False
        # The core's state after its last step (SchedulerStats, steps, encoded items), as the
        # core published it: readers (metrics, /v1/load) never touch the live scheduler.
        self.stats: dict[str, float] = {}
        self.metrics = EngineMetrics(model_name, self.snapshot)
        self.media_stats: Any = None  # an object with cache_hits / cache_misses (the MediaLoader)

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Returns once the core serves (in process mode: the child loaded the model); raises
        `EngineStartupError` with the core's error otherwise."""
        self._loop = asyncio.get_running_loop()
        info = await asyncio.to_thread(self.core.start, self._on_step_threadsafe, self._on_dead_threadsafe)
        self.max_model_len, self.num_kv_blocks, self.stats = info.max_model_len, info.num_kv_blocks, info.stats
        self._started = True

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.core.shutdown)
        self._render_pool.shutdown(wait=False, cancel_futures=True)

    def is_healthy(self) -> bool:
        return self._started and self._dead is None and self.core.is_alive()

    def is_ready(self) -> bool:
        """Serving and not draining: a load balancer may send traffic."""
        return self.is_healthy() and not self._draining

    def start_draining(self) -> None:
        """From now on /ready answers 503; requests are still accepted and served."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    def snapshot(self) -> dict[str, float]:
        snap = dict(self.stats)
        if self.media_stats is not None:
            snap["media_cache_hits"] = getattr(self.media_stats, "cache_hits", 0)
            snap["media_cache_misses"] = getattr(self.media_stats, "cache_misses", 0)
        return snap

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    # ---- EngineClient ----------------------------------------------------------------
    def generation_defaults(self) -> dict[str, Any]:
        return self.processor.generation_defaults()

    @property
    def modalities(self) -> tuple[str, ...]:
        """The media kinds the model takes ("image", "video"), as its processor declares."""
        return tuple(getattr(self.processor, "modalities", ("image",)))

    async def render_chat(
        self,
        conversation: list[dict[str, Any]],
        images: list[Image.Image],
        *,
        videos: list[Any] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> ProcessedPrompt:
        loop = asyncio.get_running_loop()
        kwargs = {"videos": videos} if videos else {}
        prompt = await loop.run_in_executor(
            self._render_pool,
            lambda: self.processor.render_chat(
                conversation, images, add_generation_prompt, chat_template_kwargs, **kwargs
            ),
        )
        return self._check_length(prompt)

    async def render_completion(self, prompt: str | list[int]) -> ProcessedPrompt:
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(self._render_pool, self.processor.render_completion, prompt)
        return self._check_length(out)

    def _check_length(self, prompt: ProcessedPrompt) -> ProcessedPrompt:
        n = len(prompt.prompt_token_ids)
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens but this model's context is {self.max_model_len} tokens "
                f"(prompt and output together); shorten the prompt, send fewer or smaller images, "
                f"or raise --max-model-len"
            )
        if n == 0:
            raise ValueError("the prompt is empty")
        return prompt

    async def generate(
        self, prompt: ProcessedPrompt, sampling_params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        if self._dead is not None or not self.core.is_alive():
            raise EngineDeadError(self._dead or "the engine is not running; restart the server")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(request_id, prompt, IncrementalDetokenizer(
            self.tokenizer, prompt.prompt_token_ids, sampling_params, getattr(self.processor, "strips_output_whitespace", False)
        ))
        self._streams[request_id] = stream
        request = Request(request_id, prompt, sampling_params, eos_token_ids=self.eos_token_ids)
        self.core.add_request(request)
        try:
            pending: BaseException | None = None
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                # When the consumer falls behind the engine (a busy event loop), what has
                # queued up goes out as one delta: fewer, larger events exactly when handling
                # events is what the server is short of.
                while not item.finished and not stream.queue.empty():
                    nxt = stream.queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        pending = nxt
                        break
                    item = item.merged_with(nxt)
                yield item
                if pending is not None:
                    raise pending
                if item.finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not stream.finished:
                self.core.abort_requests([request_id])

    async def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            stream.finished = True
            self.core.abort_requests([request_id])

    # ---- from the core client's thread --------------------------------------------------
    def _on_step_threadsafe(self, result: StepResult) -> None:
        self._loop.call_soon_threadsafe(self._on_step, result)

    def _on_dead_threadsafe(self, message: str) -> None:
        self._dead = message  # set here too: /health turns 503 before the loop runs _fail_all
        self._loop.call_soon_threadsafe(self._fail_all, message)

    # ---- event loop side -------------------------------------------------------------
    def _on_step(self, result: StepResult) -> None:
        self.stats = result.stats
        for req_id, why in result.rejected:
            stream = self._streams.get(req_id)
            if stream is not None:
                stream.finished = True
                stream.queue.put_nowait(RequestRejected(why))
        if result.outputs:
            self._dispatch(result.outputs)

    def _fail_all(self, message: str) -> None:
        for stream in list(self._streams.values()):
            stream.finished = True
            stream.queue.put_nowait(EngineDeadError(message))

    def _record(self, stream: _Stream, num_new: int, finish_reason: str | None) -> None:
        now = time.monotonic()
        m = self.metrics
        if stream.last_token_time is None:
            m.ttft.observe(now - stream.arrival)
            m.prompt_tokens.inc(len(stream.prompt.prompt_token_ids))
        elif num_new:
            m.itl.observe((now - stream.last_token_time) / num_new)
        stream.last_token_time = now
        m.generation_tokens.inc(num_new)
        if finish_reason is not None:
            m.request_finished(finish_reason, len(stream.prompt.prompt_token_ids), stream.num_output_tokens,
                               now - stream.arrival)

    def _dispatch(self, outputs: list[EngineCoreOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.req_id)
            if stream is None or stream.finished:
                continue
            text, stop_str = stream.detok.update(text_token_ids(out))
            stream.num_output_tokens += len(out.new_token_ids)
            finish_reason, stop_reason = out.finish_reason, out.stop_reason
            if stop_str is not None:
                finish_reason, stop_reason = "stop", stop_str
                if out.finish_reason is None:
                    self.core.abort_requests([out.req_id])
            elif finish_reason is not None:
                text += stream.detok.flush()
            finished = finish_reason is not None
            stream.finished = finished
            self._record(stream, len(out.new_token_ids), finish_reason)
            stream.queue.put_nowait(
                RequestOutput(
                    request_id=out.req_id,
                    text=text,
                    token_ids=list(out.new_token_ids),
                    finished=finished,
                    finish_reason=finish_reason,
                    stop_reason=stop_reason,
                    num_prompt_tokens=len(stream.prompt.prompt_token_ids),
                    num_output_tokens=stream.num_output_tokens,
                    num_cached_tokens=out.num_cached_tokens,
                    logprobs=out.new_logprobs,
                )
            )
