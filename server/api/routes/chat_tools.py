"""The chat route's structured-output and tool-calling steps (between the conversation and
the sampling params, and between the engine's text and the response message)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from vlmserve.api.errors import APIError
from vlmserve.api.protocol import AssistantMessage, ChatCompletionRequest, SamplingRequest, ToolCallItem
from vlmserve.api.structured import request_spec, validate_spec
from vlmserve.api.tools.calls import ToolPlan, plan_tools
from vlmserve.api.tools.formats import ToolFormat, tool_format
from vlmserve.api.tools.streaming import ToolStreamer, message_calls
from vlmserve.engine.structured_spec import StructuredSpec

_BACKENDS = (None, "auto", "xgrammar")


def family_of(engine: Any) -> str | None:
    """The registry family whose processor the engine serves with (None for other engines)."""
    from vlmserve.models.registry import FAMILIES

    processor = getattr(engine, "processor", None)
    if processor is None:
        return None
    path = f"{type(processor).__module__}.{type(processor).__qualname__}"
    return next((f.name for f in FAMILIES if f.processor_class_path == path), None)


def engine_tool_format(engine: Any, override: str | None) -> ToolFormat:
    processor = getattr(engine, "processor", None)
    return tool_format(family_of(engine), mistral_format=bool(getattr(processor, "mistral_format", False)),
                       override=override)


async def structured_spec(body: SamplingRequest, plan: ToolPlan | None = None) -> StructuredSpec | None:
    """The request's one output constraint (response_format, structured_outputs, guided_*, or
    a named / required tool choice), validated off the event loop: 400 if it cannot compile."""
    extra = body.model_extra or {}
    backend = extra.get("guided_decoding_backend")
    if backend not in _BACKENDS:
        raise APIError(f"guided_decoding_backend {backend!r} is not available; this server uses xgrammar",
                       param="guided_decoding_backend")
    response_format = getattr(body, "response_format", None)
    spec, source = request_spec(response_format, extra)
    if plan is not None and plan.spec is not None:
        if spec is not None:
            raise APIError(f"tool_choice {plan.mode!r} constrains the output to a tool call, so {source} cannot "
                           "apply; send one of them", param=source)
        spec, source = plan.spec, "tools" if plan.mode == "required" else "tool_choice"
    if spec is not None:
        await asyncio.to_thread(validate_spec, spec, source)
    return spec


@dataclass
class ChatTools:
    """Per request: the tool plan (None without tools) and the family's format."""

    plan: ToolPlan | None
    fmt: ToolFormat

    @classmethod
    def of(cls, body: ChatCompletionRequest, engine: Any, override: str | None) -> "ChatTools":
        plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        fmt = engine_tool_format(engine, override)
        if plan is not None and plan.mode == "auto" and not fmt.supports_auto:
            raise APIError(
                f"this model family's chat template has no tool-call format, so tool_choice 'auto' is not "
                f"available; use tool_choice 'required' or a named function (enforced by the grammar), or "
                f"start the server with --tool-call-format", param="tool_choice")
        return cls(plan, fmt)

    def prepare(self, conversation: list[dict[str, Any]], template_kwargs: dict[str, Any] | None
                ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        has_history = any(m.get("tool_calls") or m["role"] == "tool" for m in conversation)
        if self.plan is None and not has_history:
            return conversation, template_kwargs
        conversation, extra = self.fmt.prepare(conversation, self.plan)
        if not extra:
            return conversation, template_kwargs
        return conversation, {**(template_kwargs or {}), **extra}

    @property
    def skip_special_tokens(self) -> bool | None:
        """auto mode with a format whose call marker is a special token keeps special tokens."""
        if self.plan is not None and self.plan.mode == "auto":
            return self.fmt.skip_special_tokens
        return None

    def message(self, text: str, finish_reason: str) -> tuple[AssistantMessage, str]:
        if self.plan is None or self.plan.mode == "none":
            return AssistantMessage(content=text), finish_reason
        content, calls = message_calls(self.plan, self.fmt, text)
        if not calls:
            return AssistantMessage(content=content), finish_reason
        items = [ToolCallItem(id=c.id, function={"name": c.name, "arguments": c.arguments}) for c in calls]
        return AssistantMessage(content=content, tool_calls=items), ("tool_calls" if finish_reason == "stop" else
                                                                     finish_reason)

    def streamer(self) -> ToolStreamer | None:
        if self.plan is None or self.plan.mode == "none":
            return None
        return ToolStreamer(self.plan, self.fmt)
