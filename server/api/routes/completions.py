"""POST /v1/completions (legacy text completions; one prompt per request)."""

from __future__ import annotations

from typing import AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response

from vlmserve.api.load_gate import check_admission, record_request_params
from vlmserve.api.deps import EngineDep, IntakeDep, TokenRendererDep
from vlmserve.api.errors import APIError, internal_error
from vlmserve.api.generation import (
    SSEResponse,
    collect_choices,
    generate_choices,
    guarded_stream,
    run_unless_disconnected,
    sse_event,
)
from vlmserve.api.logprobs import TokenRenderer
from vlmserve.api.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from vlmserve.api.routes.common import (
    ResponseContext,
    check_request,
    check_unicode,
    make_usage,
    render_prompt,
)
from vlmserve.api.routes.chat_tools import structured_spec
from vlmserve.api.sampling import build_sampling_params
from vlmserve.engine.outputs import RequestOutput
from vlmserve.engine.sampling_params import SamplingParams

router = APIRouter()


def single_prompt(prompt: str | list[int] | list[str]) -> str | list[int]:
    """The one prompt of a request: a string or token ids (a one-string list is unwrapped)."""
    if isinstance(prompt, str):
        check_unicode(prompt, "prompt")
        return prompt
    if not prompt:
        raise APIError("prompt is empty; send a string or a list of token ids", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise APIError(f"batched prompts are not supported (got {len(prompt)}); send one prompt per request",
                           param="prompt")
        check_unicode(prompt[0], "prompt[0]")  # type: ignore[arg-type]
        return prompt[0]  # type: ignore[return-value]
    if any(p < 0 for p in prompt):  # type: ignore[operator]
        raise APIError("prompt token ids must be non-negative", param="prompt")
    return prompt  # type: ignore[return-value]


@router.post("/v1/completions", response_model=None)
async def create_completion(
    body: CompletionRequest, request: Request, engine: EngineDep, renderer: TokenRendererDep, intake: IntakeDep,
) -> CompletionResponse | Response:
    check_request(body, engine)
    check_admission(request)
    spec = await structured_spec(body)  # vLLM's structured_outputs / guided_* fields
    with intake.admit(body.n or 1, []) as ticket:  # counted from here until the response ends
        prompt = await render_prompt(engine.render_completion(single_prompt(body.prompt)), param="prompt")
        prompt_len = len(prompt.prompt_token_ids)
        params = build_sampling_params(body, defaults=engine.generation_defaults(), prompt_len=prompt_len,
                                       max_model_len=engine.max_model_len, structured=spec)
        record_request_params(request, params)
        ctx = ResponseContext.new("cmpl", engine.model_name)
        outputs = generate_choices(engine, prompt, params, ctx.id)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = _stream_chunks(ctx, outputs, params, prompt_len, include_usage, renderer)
            return SSEResponse(guarded_stream(chunks, outputs), on_close=ticket.detach())
        return await run_unless_disconnected(request, _full_response(ctx, outputs, params, prompt_len, renderer))


async def _full_response(
    ctx: ResponseContext, outputs: AsyncIterator[tuple[int, RequestOutput]], params: SamplingParams,
    prompt_len: int, renderer: TokenRenderer,
) -> CompletionResponse:
    collected = await collect_choices(outputs, params.n)
    choices = []
    for c in collected.choices:
        if c.finish_reason is None:
            raise internal_error()  # the engine's stream ended without a finished output
        logprobs = None
        if params.logprobs is not None:
            logprobs = renderer.completion_logprobs(c.logprobs, params.logprobs, text_offset=0)
        choices.append(CompletionChoice(index=c.index, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason))
    usage = make_usage(prompt_len, sum(c.num_output_tokens for c in collected.choices), collected.num_cached_tokens)
    return CompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, usage=usage)


async def _stream_chunks(
    ctx: ResponseContext, outputs: AsyncIterator[tuple[int, RequestOutput]], params: SamplingParams,
    prompt_len: int, include_usage: bool, renderer: TokenRenderer,
) -> AsyncIterator[str]:
    exclude = None if include_usage else {"usage"}

    def event(choices: list[CompletionChoice], **kw) -> str:
        chunk = CompletionResponse(id=ctx.id, created=ctx.created, model=ctx.model, choices=choices, **kw)
        return sse_event(chunk.model_dump_json(exclude=exclude))

    num_output = [0] * params.n
    finished = [False] * params.n
    # Per choice: characters of token text so far, the legacy logprobs' `text_offset` base.
    offsets = [0] * params.n
    num_cached = 0
    async for index, out in outputs:
        num_output[index] = out.num_output_tokens
        num_cached = max(num_cached, out.num_cached_tokens)
        finish = (out.finish_reason or "stop") if out.finished else None
        finished[index] = finished[index] or out.finished
        logprobs = None
        if params.logprobs is not None and out.logprobs:
            logprobs = renderer.completion_logprobs(out.logprobs, params.logprobs, text_offset=offsets[index])
            offsets[index] += sum(len(t) for t in logprobs.tokens)
        if not out.text and logprobs is None and finish is None:
            continue  # the step's text is held back (stop-string candidate, split character)
        yield event([CompletionChoice(index=index, text=out.text, logprobs=logprobs, finish_reason=finish)])
    if not all(finished):
        raise internal_error()
    if include_usage:
        yield event([], usage=make_usage(prompt_len, sum(num_output), num_cached))
