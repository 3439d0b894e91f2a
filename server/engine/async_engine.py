"""AsyncEngine: the EngineClient the API layer talks to.

Threads: the EngineCore step loop runs on its own thread ("engine-core") so the event loop
never waits for a forward pass; chat rendering (template, tokenizer, image processing) runs
in a worker pool. The event loop only queues requests, detokenizes (a few tokens per step)
and hands outputs to the per-request streams.

Cross-thread traffic: `_inputs` (event loop → core thread: add / abort) and
`loop.call_soon_threadsafe` (core thread → event loop: outputs, faults).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from PIL import Image

from server.engine.detokenizer import IncrementalDetokenizer, text_token_ids
from server.engine.engine_core import EngineCore
from server.engine.metrics import EngineMetrics
from server.engine.outputs import EngineCoreOutput, RequestOutput
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.multimodal.inputs import ProcessedPrompt

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; the server must be restarted (``/health`` reports 503)."""


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
        core: EngineCore,
        processor: Any,
        *,
        model_name: str,
        max_model_len: int,
        render_workers: int = 4,
    ) -> None:
        self.core = core
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(processor.eos_token_ids)
        self._render_pool = ThreadPoolExecutor(max_workers=render_workers, thread_name_prefix="render")
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dead: BaseException | None = None
        self._draining = False
        self.num_steps = 0
        # The scheduler's state after the last step, published by the engine thread: readers
        # (metrics, /v1/load) never touch the scheduler's live structures.
        self.stats: dict[str, float] = dataclasses.asdict(core.scheduler.get_stats())
        self.metrics = EngineMetrics(model_name, self.snapshot)
        self.media_stats: Any = None  # an object with cache_hits / cache_misses (the MediaLoader)

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_core, name="engine-core", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping.set()
        self._inputs.put(("wake", None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._render_pool.shutdown(wait=False, cancel_futures=True)

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    def is_ready(self) -> bool:
        """Serving and not draining: a load balancer may send traffic."""
        return self.is_healthy() and not self._draining

    def start_draining(self) -> None:
        self._draining = True

    def snapshot(self) -> dict[str, float]:
        snap = dict(self.stats)
        snap["steps"] = self.num_steps
        snap["encoded_items"] = self.core.runner.encoder.num_encoded_items
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
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an internal error: {self._dead!r}")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(request_id, prompt, IncrementalDetokenizer(self.tokenizer, prompt.prompt_token_ids, sampling_params))
        self._streams[request_id] = stream
        request = Request(request_id, prompt, sampling_params, eos_token_ids=self.eos_token_ids)
        self._inputs.put(("add", request))
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not stream.finished:
                self._inputs.put(("abort", [request_id]))

    async def abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            stream.finished = True
            self._inputs.put(("abort", [request_id]))

    # ---- core thread -----------------------------------------------------------------
    def _drain_inputs(self, block: bool) -> None:
        try:
            item = self._inputs.get(timeout=0.5) if block else self._inputs.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = item
            if kind == "add":
                try:
                    self.core.add_request(payload)
                except ValueError as e:
                    self._loop.call_soon_threadsafe(self._fail_one, payload.request_id, e)
            elif kind == "abort":
                self.core.abort_requests(payload)
            try:
                item = self._inputs.get_nowait()
            except queue.Empty:
                return

    def _run_core(self) -> None:
        while not self._stopping.is_set():
            try:
                self._drain_inputs(block=not self.core.has_unfinished_requests())
                if not self.core.has_unfinished_requests():
                    continue
                outputs = self.core.step()
                self.num_steps += 1
                self.stats = dataclasses.asdict(self.core.scheduler.get_stats())
            except Exception as e:  # an engine fault: fail every stream, report unhealthy
                logger.exception("engine step failed")
                self._dead = e
                self._loop.call_soon_threadsafe(self._fail_all, e)
                return
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)

    # ---- event loop side -------------------------------------------------------------
    def _fail_one(self, request_id: str, error: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.finished = True
            stream.queue.put_nowait(error)

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.finished = True
            stream.queue.put_nowait(EngineDeadError(f"the engine stopped after an internal error: {error!r}"))

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
                    self._inputs.put(("abort", [out.req_id]))
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
