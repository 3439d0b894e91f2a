"""POST /v1/chat/completions."""

from __future__ import annotations

import dataclasses
from typing import Any, AsyncIterator, Iterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from vlmserve.api.load_gate import check_admission, record_request_params
from vlmserve.api.deps import ConfigDep, EngineDep, IntakeDep, MediaDep, TokenRendererDep
from vlmserve.api.errors import internal_error
from vlmserve.api.generation import (
    SSEResponse,
    collect_choices,
    generate_choices,
    guarded_stream,
    run_unless_disconnected,
    sse_event,
)
from vlmserve.api.logprobs import TokenRenderer
from vlmserve.api.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatStreamChoice,
)
from vlmserve.api.routes.chat_tools import ChatTools, structured_spec
from vlmserve.api.routes.common import ResponseContext, check_request, make_usage, render_prompt
from vlmserve.api.routes.conversation import check_media_limits, check_modalities, load_media, to_hf_conversation
from vlmserve.api.sampling import build_sampling_params
from vlmserve.api.tools.streaming import ToolStreamer
from vlmserve.engine.outputs import RequestOutput
from vlmserve.engine.sampling_params import SamplingParams

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, media: MediaDep, renderer: TokenRendererDep,
    config: ConfigDep, intake: IntakeDep,
) -> ChatCompletionResponse | Response:
    check_request(body, engine)
    check_admission(request)
    conversation, refs = to_hf_conversation(body.messages)
    tools = ChatTools.of(body, engine, config.tool_call_format)
    conversation, template_kwargs = tools.prepare(conversation, body.chat_template_kwargs)
    spec = await structured_spec(body, tools.plan)
    check_modalities(refs, getattr(engine, "modalities", ("image", "video")), engine.model_name)
    check_media_limits(refs, config.limit_mm_per_prompt)
    # Counted and accounted from here (before any fetch) until the response ends.
    with intake.admit(body.n or 1, [(r.kind, r.url) for r in refs]) as ticket:
        # A client that leaves while its media load (a slow URL: up to --image-timeout-s) stops it.
        loaded = await run_unless_disconnected(request, load_media(refs, media, ticket.hold))
        ticket.media_loaded()
        if isinstance(loaded, Response):
            return loaded
        images, videos = loaded
        # `videos` is passed only when present, so engines of image-only families need no video argument.
        extra = {"videos": videos} if videos else {}
        prompt = await render_prompt(
            engine.render_chat(conversation, images, add_generation_prompt=body.add_generation_prompt,
                               chat_template_kwargs=template_kwargs, **extra),
            param="messages",
        )
        del images, videos, extra  # the decoded media: from here the request holds only its pixels
        ticket.rendered(prompt)
        prompt_len = len(prompt.prompt_token_ids)
        params = build_sampling_params(body, defaults=engine.generation_defaults(), prompt_len=prompt_len,
                                       max_model_len=engine.max_model_len, structured=spec)
        if tools.skip_special_tokens is not None:
            params = dataclasses.replace(params, skip_special_tokens=tools.skip_special_tokens)
        record_request_params(request, params)
        ctx = ResponseContext.new("chatcmpl", engine.model_name)
        outputs = generate_choices(engine, prompt, params, ctx.id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _stream_chunks(ctx, outputs, params, prompt_len, include_usage, renderer, tools)
            return SSEResponse(guarded_stream(chunks, outputs), on_close=ticket.detach())
        return await run_unless_disconnected(
            request, _full_response(ctx, outputs, params, prompt_len, renderer, tools)
        )


async def _full_response(
    ctx: ResponseContext, outputs: AsyncIterator[tuple[int, RequestOutput]], params: SamplingParams,
    prompt_len: int, renderer: TokenRenderer, tools: ChatTools,
) -> ChatCompletionResponse:
    collected = await collect_choices(outputs, params.n)
    choices = []
    for c in collected.choices:
        if c.finish_reason is None:
            raise internal_error()  # the engine's stream ended without a finished output
        logprobs = renderer.chat_logprobs(c.logprobs, params.logprobs) if params.logprobs is not None else None
        message, finish_reason = tools.message(c.text, c.finish_reason)
        choices.append(ChatChoice(index=c.index, message=message, logprobs=logprobs, finish_reason=finish_reason))
    usage = make_usage(prompt_len, sum(c.num_output_tokens for c in collected.choices), collected.num_cached_tokens)
    return ChatCompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, usage=usage)


async def _stream_chunks(
    ctx: ResponseContext, outputs: AsyncIterator[tuple[int, RequestOutput]], params: SamplingParams,
    prompt_len: int, include_usage: bool, renderer: TokenRenderer, tools: ChatTools,
) -> AsyncIterator[str]:
    exclude = None if include_usage else {"usage"}

    def event(choices: list[ChatStreamChoice], **kw) -> str:
        chunk = ChatCompletionChunk(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, **kw)
        return sse_event(chunk.model_dump_json(exclude=exclude))

    for i in range(params.n):
        yield event([ChatStreamChoice(index=i, delta={"role": "assistant", "content": ""})])
    num_output = [0] * params.n
    finished = [False] * params.n
    num_cached = 0
    streamers = [tools.streamer() for _ in range(params.n)]
    async for index, out in outputs:
        num_output[index] = out.num_output_tokens
        num_cached = max(num_cached, out.num_cached_tokens)
        finish = (out.finish_reason or "stop") if out.finished else None
        finished[index] = finished[index] or out.finished
        logprobs = None
        if params.logprobs is not None and out.logprobs:
            logprobs = renderer.chat_logprobs(out.logprobs, params.logprobs)
        streamer = streamers[index]
        if streamer is not None:
            for delta, fin in _tool_deltas(streamer, out.text, finish):
                yield event([ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=fin)])
                logprobs = None
            continue
        if not out.text and logprobs is None and finish is None:
            continue  # the step's text is held back (stop-string candidate, split character)
        delta = {"content": out.text} if out.text or logprobs is not None else {}
        yield event([ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)])
    if not all(finished):
        raise internal_error()
    if include_usage:
        yield event([], usage=make_usage(prompt_len, sum(num_output), num_cached))


def _tool_deltas(streamer: ToolStreamer, text: str, finish: str | None) -> Iterator[tuple[dict[str, Any], str | None]]:
    """(delta, finish_reason) events of one engine output of a tool-calling choice; the last
    event of a finished choice carries the finish reason ("tool_calls" once calls were sent)."""
    content, calls = streamer.feed(text)
    events: list[dict[str, Any]] = []
    if content:
        events.append({"content": content})
    if calls:
        events.append({"tool_calls": calls})
    if finish is not None:
        content, calls = streamer.finish()
        if content:
            events.append({"content": content})
        if calls:
            events.append({"tool_calls": calls})
        if streamer.num_calls and finish == "stop":
            finish = "tool_calls"
    for i, delta in enumerate(events):
        yield delta, (finish if i == len(events) - 1 else None)
    if not events and finish is not None:
        yield {}, finish
