"""Running the engine requests of one API call and streaming them out (shared by chat and
completions).

Invariant: every iterator returned by `engine.generate` is closed (`aclose`) on every exit
path (normal end, error, client gone), because closing it is what aborts the engine
request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from vlmserve.api.errors import APIError, internal_error
from vlmserve.api.sampling import params_for_choice
from vlmserve.engine.client import EngineClient, EngineDeadError, RequestRejected
from vlmserve.engine.outputs import RequestOutput, TokenLogprob
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.multimodal.inputs import ProcessedPrompt

logger = logging.getLogger(__name__)
T = TypeVar("T")

# HTTP status for a request whose client went away (nginx's convention); nobody reads it.
CLIENT_CLOSED_REQUEST = 499
_DONE = object()


def engine_request_ids(request_id: str, n: int) -> list[str]:
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


async def _pump(index: int, start: Callable[[], AsyncIterator[RequestOutput]], queue: asyncio.Queue) -> None:
    stream: AsyncIterator[RequestOutput] | None = None
    try:
        stream = start()
        async for out in stream:
            await queue.put((index, out))
        await queue.put((index, _DONE))
    except Exception as e:  # handed to the consumer, which answers it
        await queue.put((index, e))
    finally:
        if stream is not None:
            await stream.aclose()  # type: ignore[attr-defined]


async def generate_choices(
    engine: EngineClient, prompt: ProcessedPrompt, params: SamplingParams, request_id: str
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Runs `params.n` engine requests concurrently; yields (choice index, output) as they come.

    Engine failures become APIError: 503 when the engine aborted the request (drain,
    shutdown), 500 otherwise. An output with finish_reason "abort" never reaches the caller.
    """
    ids = engine_request_ids(request_id, params.n)
    if params.n == 1:
        # One choice: read the engine stream in this task. No pump task and queue in between
        # (a task switch per token), and outputs that queue up behind a busy event loop stay in
        # the engine stream, which merges them.
        stream = engine.generate(prompt, params, request_id)
        try:
            try:
                async for out in stream:
                    yield 0, _checked(out, ids[0])
            except APIError:
                raise
            except Exception as e:  # what a pump hands on (`_pump`)
                _checked(e, ids[0])
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return
    queue: asyncio.Queue = asyncio.Queue()
    tasks = []
    try:
        for i, rid in enumerate(ids):
            start = functools.partial(engine.generate, prompt, params_for_choice(params, i), rid)
            tasks.append(asyncio.create_task(_pump(i, start, queue)))
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _DONE:
                remaining -= 1
                continue
            yield index, _checked(item, ids[index])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _checked(item: RequestOutput | BaseException, engine_request_id: str) -> RequestOutput:
    """An engine output, or the APIError its failure is answered with."""
    if isinstance(item, RequestRejected):
        raise APIError(str(item), 400, code="request_rejected")
    if isinstance(item, EngineDeadError):
        logger.error("engine request %s failed: %s", engine_request_id, item)
        raise APIError("the engine stopped after an internal error (the server log has the cause) and this "
                       "replica no longer serves (/health answers 503): retry the request", 500,
                       code="engine_error")
    if isinstance(item, BaseException):
        logger.error("engine request %s failed", engine_request_id, exc_info=item)
        raise internal_error()
    if item.finish_reason == "error":
        raise APIError("the engine failed while running this request (the server log has the cause); the "
                       "server goes on serving: retry it", 500, code="engine_error")
    if item.finish_reason == "abort":
        raise APIError("the server aborted this request (it is shutting down or overloaded); retry it",
                       503, code="request_aborted")
    return item


@dataclass
class ChoiceResult:
    index: int
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


@dataclass
class Collected:
    choices: list[ChoiceResult]
    num_cached_tokens: int = 0


async def collect_choices(outputs: AsyncIterator[tuple[int, RequestOutput]], n: int) -> Collected:
    result = Collected([ChoiceResult(i) for i in range(n)])
    try:
        async for index, out in outputs:
            choice = result.choices[index]
            choice.text_parts.append(out.text)
            choice.logprobs.extend(out.logprobs or ())
            choice.num_output_tokens = out.num_output_tokens
            result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
            if out.finished:
                choice.finish_reason = out.finish_reason or "stop"
    finally:
        await outputs.aclose()  # type: ignore[attr-defined]
    return result


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Awaits `work`, cancelling it (and so aborting its engine requests) if the client
    disconnects first. Non-streaming responses need this: Starlette does not cancel a
    handler whose client went away, and the generation would run to its end for nobody."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
        if not work_task.done():
            work_task.cancel()
        await asyncio.gather(watch_task, work_task, return_exceptions=True)
    if work_task.cancelled():
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return work_task.result()


def sse_event(payload: Any) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def stream_error_event(exc: BaseException) -> str:
    """After the 200 went out, errors travel as a `data: {"error": ...}` event."""
    if not isinstance(exc, APIError):
        logger.exception("error while streaming a response", exc_info=exc)
        exc = internal_error()
    return sse_event(exc.body())


class SSEResponse(StreamingResponse):
    """`text/event-stream` that always closes its body iterator, even when the client
    disconnects while the iterator is suspended at a `yield` (Starlette only cancels the
    sending task then, which would leave the engine requests running)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def guarded_stream(chunks: AsyncIterator[str], outputs: AsyncIterator[Any]) -> AsyncIterator[str]:
    """Yields `chunks`, then `[DONE]`; an error becomes an error event before `[DONE]`.
    On every exit both `chunks` and the engine `outputs` it reads are closed."""
    try:
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as e:
            yield stream_error_event(e)
        yield SSE_DONE
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
        await outputs.aclose()  # type: ignore[attr-defined]
