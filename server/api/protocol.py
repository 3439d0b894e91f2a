"""OpenAI-compatible request and response models (pydantic).

Request models validate types only (a type error is a 422 with the field path); ranges
are checked when the request becomes a `SamplingParams` (`server/api/sampling.py`), where
an out-of-range value is a 400 that names the allowed range.

Unknown request fields are ignored, as vLLM and OpenAI's own server do, so that clients
sending newer or vendor-specific fields keep working. Known OpenAI fields and vLLM
extensions whose behaviour we do not implement are rejected with a 400 by
`unsupported_param` instead of being silently dropped, since ignoring them would change the
answer; their neutral values (false, null, the default) pass.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- chat messages ---------------------------------------------------------------------


class MediaURL(OpenAIModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ImagePart(OpenAIModel):
    type: Literal["image_url"]
    image_url: MediaURL | str  # vLLM also accepts a bare URL string


class VideoPart(OpenAIModel):
    type: Literal["video_url"]
    video_url: MediaURL | str


class OtherPart(OpenAIModel):
    """Any other part type (input_audio, file, refusal, ...): parsed so that the
    conversion can answer 400 "not supported" instead of a schema error."""

    model_config = ConfigDict(extra="allow")
    type: str


# Tags are the class names: pydantic puts the tag in error paths, and a class name is
# recognisably not a field there (see `server/api/errors.py`).
_PART_TAGS = {"text": "TextPart", "image_url": "ImagePart", "video_url": "VideoPart"}


def _part_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _PART_TAGS.get(kind, "OtherPart") if isinstance(kind, str) else "OtherPart"


ContentPart = Annotated[
    Union[
        Annotated[TextPart, Tag("TextPart")],
        Annotated[ImagePart, Tag("ImagePart")],
        Annotated[VideoPart, Tag("VideoPart")],
        Annotated[OtherPart, Tag("OtherPart")],
    ],
    Discriminator(_part_tag),
]


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; not implemented (refused when true)


# ---- requests --------------------------------------------------------------------------


class SamplingRequest(OpenAIModel):
    """Fields shared by chat and text completions (OpenAI's, then vLLM's extensions)."""

    # Unknown fields are kept (in `model_extra`) only so `unsupported_param` can refuse the
    # vLLM extensions we do not implement; nothing else reads them.
    model_config = ConfigDict(extra="allow")

    model: str
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extensions.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """(the requested output budget or None, the field name that carried it)."""
        raise NotImplementedError

    def requested_logprobs(self) -> tuple[int | None, str]:
        """(top logprobs per token, 0 for the sampled token only, None for no logprobs;
        the field name to blame when it is out of range)."""
        raise NotImplementedError


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # Validated by `vlmserve.api.tools.calls.plan_tools` (the legacy functions/function_call are refused).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    # vLLM extensions.
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def requested_logprobs(self) -> tuple[int | None, str]:
        if not self.logprobs:
            return None, "logprobs"
        return (self.top_logprobs or 0), "top_logprobs"


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def requested_max_tokens(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def requested_logprobs(self) -> tuple[int | None, str]:
        return self.logprobs, "logprobs"


def _neutral(value: Any, default: Any = None) -> bool:
    return value is None or value == default or (value is False and default is None) or value == [] or value == {}


# vLLM request extensions we do not implement, with their neutral value (sent by vLLM-based
# tools with defaults filled in; any other value would change the answer).
_VLLM_UNSUPPORTED: dict[str, Any] = {
    "prompt_logprobs": None, "use_beam_search": False, "length_penalty": 1.0, "truncate_prompt_tokens": None,
    "guided_whitespace_pattern": None,
    "bad_words": None, "allowed_token_ids": None, "logits_processors": None, "priority": 0,
    "continue_final_message": False, "chat_template": None, "documents": None, "mm_processor_kwargs": None,
    "return_tokens_as_token_ids": False, "vllm_xargs": None,
}


def unsupported_param(request: SamplingRequest) -> tuple[str, str] | None:
    """(param, message) for the first field set to a behaviour we do not implement."""
    if request.logit_bias:
        return "logit_bias", "logit_bias is not supported; remove it"
    for name, neutral in _VLLM_UNSUPPORTED.items():
        value = (request.model_extra or {}).get(name)
        if not _neutral(value, neutral):
            return name, f"{name} is not supported by this server; remove it (or send {neutral!r})"
    if request.stream_options is not None and request.stream_options.continuous_usage_stats:
        return "stream_options", "stream_options.continuous_usage_stats is not supported; usage comes in the last chunk"
    if isinstance(request, ChatCompletionRequest):
        if request.functions:
            return "functions", "the legacy functions field is not supported; send tools instead"
        if request.function_call is not None and request.function_call != "none":
            return "function_call", "the legacy function_call field is not supported; send tool_choice instead"
        if request.audio is not None or "audio" in (request.modalities or []):
            return "modalities", "audio output is not supported; use modalities ['text']"
        if request.prediction is not None:
            return "prediction", "predicted outputs are not supported; remove prediction"
        if request.top_logprobs is not None and not request.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        extra = request.model_extra or {}
        if extra.get("echo"):
            return "echo", "echo is not supported; prepend the prompt to the reply yourself"
        if not _neutral(extra.get("best_of"), request.n or 1):
            return "best_of", "best_of is not supported; use n to get several completions"
    if isinstance(request, CompletionRequest):
        if request.echo:
            return "echo", "echo is not supported; prepend the prompt to the completion yourself"
        if request.suffix:
            return "suffix", "suffix (insertion) is not supported; remove it"
        if request.best_of is not None and request.best_of != (request.n or 1):
            return "best_of", "best_of is not supported; use n to get several completions"
    return None


# ---- responses -------------------------------------------------------------------------


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIModel):
    content: list[TokenLogprobEntry] | None = None


class CompletionLogprobs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0


class Usage(OpenAIModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # JSON text


class ToolCallItem(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallItem] | None = None


class ChatChoice(OpenAIModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatStreamChoice(OpenAIModel):
    index: int
    # {"role": "assistant", "content": ""} first, then {"content": ...} or {"tool_calls": [...]}
    # (`vlmserve.api.tools.streaming`); {} on a bare finish.
    delta: dict[str, Any]
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(OpenAIModel):
    """Streamed; `usage` is serialized only when the client asked for include_usage (then
    null on every chunk but the last, which has no choices)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(OpenAIModel):
    """Also the shape of each streamed chunk (usage as in `ChatCompletionChunk`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vlmserve"
    max_model_len: int


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
