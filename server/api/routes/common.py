"""Request preparation shared by the chat and completions routes."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable

from vlmserve.api.errors import APIError, internal_error
from vlmserve.api.protocol import PromptTokensDetails, SamplingRequest, Usage, unsupported_param
from vlmserve.engine.client import EngineClient
from vlmserve.multimodal.inputs import ProcessedPrompt
from vlmserve.multimodal.types import MediaError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResponseContext:
    """What every chunk or response of one API call repeats."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, prefix: str, model: str) -> "ResponseContext":
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", model=model)


def check_capacity(engine: EngineClient, max_pending: int) -> None:
    """Admission control: past `max_pending` unfinished requests, shed load with a 503 and
    Retry-After before fetching or decoding anything, instead of queueing without bound."""
    pending = getattr(engine, "num_unfinished", 0)
    if pending >= max_pending:
        raise APIError(
            f"the server is at capacity ({pending} requests in flight, --max-pending-requests {max_pending}); "
            "retry after a short wait",
            503, code="overloaded", type="server_error", headers={"Retry-After": "1"},
        )


def check_request(request: SamplingRequest, engine: EngineClient) -> None:
    """The checks that need no prompt: the model name and unsupported parameters."""
    if request.model != engine.model_name:
        raise APIError(
            f"the model {request.model!r} does not exist on this server; it serves {engine.model_name!r}",
            404, param="model", code="model_not_found",
        )
    unsupported = unsupported_param(request)
    if unsupported is not None:
        param, message = unsupported
        raise APIError(message, param=param, code="unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        # vLLM's rule: the options describe a stream, so without one they are a client mistake.
        raise APIError("stream_options is only allowed with stream: true; set stream or remove stream_options",
                       param="stream_options")


def check_unicode(text: str, param: str) -> None:
    """400 for a lone UTF-16 surrogate ("\\ud800" in the JSON): Python keeps it in the str, but
    it is not Unicode text, and the tokenizer fails on it (a 500 otherwise)."""
    if text.isascii():  # O(1) for the common case
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            f"{param} is not valid Unicode: it has a lone surrogate U+{ord(text[e.start]):04X} at character "
            f"{e.start}; in JSON, \\uD800-\\uDBFF must be followed by \\uDC00-\\uDFFF (send UTF-8 text)",
            param=param, code="invalid_unicode",
        ) from None


async def render_prompt(rendering: Awaitable[ProcessedPrompt], param: str) -> ProcessedPrompt:
    """Awaits the engine's render_*; its ValueErrors are the client's fault (400)."""
    try:
        prompt = await rendering
    except MediaError as e:
        raise APIError(str(e), e.status_code, param=e.param or param) from None
    except ValueError as e:
        raise APIError(str(e), param=param) from None
    except Exception:
        logger.exception("rendering the prompt failed")
        raise internal_error() from None
    if not prompt.prompt_token_ids:
        raise APIError("the prompt is empty after rendering; send some text", param=param)
    return prompt


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    """`completion_tokens` sums every choice; the prompt is counted once (OpenAI's rule for n > 1)."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )
