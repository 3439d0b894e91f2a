"""OpenAI chat messages → HF conversation + media references, and loading that media.

The HF conversation is what chat templates take: `[{"role", "content"}]` where content is
the message's string as-is, or a list of `{"type": "text", "text"}`, `{"type": "image"}`
and `{"type": "video"}` parts. Media parts are replaced by these placeholders, and their
URLs are returned in prompt order: the i-th `{"type": "image"}` is the i-th image loaded.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

from vlmserve.api.errors import APIError
from vlmserve.api.protocol import ChatMessage, ImagePart, MediaURL, OtherPart, TextPart, VideoPart
from vlmserve.api.routes.common import check_unicode
from vlmserve.api.intake import media_memory_error
from vlmserve.multimodal.budget import MediaHold, MediaMemoryExceeded
from vlmserve.multimodal.media import MediaError, MediaLoader

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass(frozen=True)
class MediaRef:
    kind: Literal["image", "video"]
    url: str
    param: str  # where it came from, e.g. "messages[1].content[2].image_url"


def _url(value: MediaURL | str) -> str:
    return value if isinstance(value, str) else value.url


def to_hf_conversation(messages: list[ChatMessage]) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    """Pure conversion; raises APIError(400) for roles and parts we cannot serve."""
    conversation: list[dict[str, Any]] = []
    media: list[MediaRef] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = _ROLES.get(msg.role)
        if role is None:
            raise APIError(f"{where}: role {msg.role!r} is not supported; use system, user, assistant or tool",
                           param=f"{where}.role")
        if msg.tool_calls:
            if role != "assistant":
                raise APIError(f"{where}: only assistant messages carry tool_calls", param=f"{where}.tool_calls")
            entry = {"role": "assistant", "content": msg.content if isinstance(msg.content, str) else "",
                     "tool_calls": _tool_calls(msg.tool_calls, f"{where}.tool_calls")}
            conversation.append(entry)
            continue
        if role == "tool":
            text = msg.content if isinstance(msg.content, str) else "".join(
                p.text for p in (msg.content or []) if isinstance(p, TextPart))
            check_unicode(text, f"{where}.content")
            conversation.append({"role": "tool", "content": text, "tool_call_id": msg.tool_call_id})
            continue
        if msg.content is None:
            if role != "assistant":
                raise APIError(f"{where}: content is required for role {msg.role!r}", param=f"{where}.content")
            conversation.append({"role": role, "content": ""})
            continue
        if isinstance(msg.content, str):
            check_unicode(msg.content, f"{where}.content")
            conversation.append({"role": role, "content": msg.content})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(msg.content):
            part_where = f"{where}.content[{j}]"
            if isinstance(part, TextPart):
                check_unicode(part.text, f"{part_where}.text")
                parts.append({"type": "text", "text": part.text})
                continue
            if isinstance(part, OtherPart):
                raise APIError(f"{part_where}: content part type {part.type!r} is not supported; "
                               "use text, image_url or video_url", param=f"{part_where}.type")
            if role != "user":
                raise APIError(f"{part_where}: images and videos are only accepted in user messages",
                               param=part_where)
            if isinstance(part, ImagePart):
                media.append(MediaRef("image", _url(part.image_url), f"{part_where}.image_url"))
                parts.append({"type": "image"})
            elif isinstance(part, VideoPart):
                media.append(MediaRef("video", _url(part.video_url), f"{part_where}.video_url"))
                parts.append({"type": "video"})
        conversation.append({"role": role, "content": parts})
    return conversation, media


def _tool_calls(calls: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """OpenAI assistant tool_calls → the shape chat templates read: arguments as an object
    when they are JSON (templates dump them with `tojson`), else the string as sent."""
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(f"{where}[{k}].function.name must be a string", param=f"{where}[{k}].function")
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        out.append({"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _media_error(exc: MediaError, ref: MediaRef) -> APIError:
    # The loader only knows the kind ("image_url"); the part's path in the request is ours.
    return APIError(f"{ref.param}: {exc}", exc.status_code, param=ref.param)


async def _load_one(loader: MediaLoader, ref: MediaRef, hold: MediaHold | None, key: str) -> Any:
    accounted = () if hold is None else (hold, key)
    try:
        if ref.kind == "image":
            return await loader.load_image(ref.url, *accounted)
        return await loader.load_video(ref.url, *accounted)  # type: ignore[attr-defined]
    except MediaError as e:
        raise _media_error(e, ref) from None
    except MediaMemoryExceeded as e:
        raise media_memory_error(e) from None


async def load_media(refs: list[MediaRef], loader: MediaLoader,
                     hold: MediaHold | None = None) -> tuple[list[Image.Image], list[Any]]:
    """Loads every reference concurrently; returns (images, videos), each in prompt order.
    The first failure cancels the other loads and becomes the error answered. With `hold`,
    the i-th reference is accounted under the key str(i) (`vlmserve.api.intake`)."""
    if any(r.kind == "video" for r in refs) and not hasattr(loader, "load_video"):
        first = next(r for r in refs if r.kind == "video")
        raise APIError("video_url input is not supported yet; send sampled frames as image_url parts",
                       param=first.param)
    if not refs:
        return [], []
    tasks = [asyncio.ensure_future(_load_one(loader, ref, hold, str(i))) for i, ref in enumerate(refs)]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    images = [r for r, ref in zip(results, refs, strict=True) if ref.kind == "image"]
    videos = [r for r, ref in zip(results, refs, strict=True) if ref.kind == "video"]
    return images, videos


def check_modalities(refs: list[MediaRef], accepted: tuple[str, ...], model_name: str) -> None:
    """Media the model cannot take (a video for an image-only family): refused before
    anything is fetched or decoded."""
    for ref in refs:
        if ref.kind not in accepted:
            raise APIError(
                f"{ref.param}: model {model_name!r} does not take {ref.kind} input; it takes "
                f"{' and '.join(accepted) or 'text only'}",
                400, param=ref.param, code="unsupported_modality",
            )


def check_media_limits(refs: list[MediaRef], limits: dict[str, int]) -> None:
    """`--limit-mm-per-prompt`: refuse before anything is fetched or decoded."""
    for kind, limit in limits.items():
        count = sum(1 for r in refs if r.kind == kind)
        if count > limit:
            raise APIError(
                f"this request has {count} {kind}s but at most {limit} are allowed per request "
                f"(--limit-mm-per-prompt {kind}=N raises it)",
                400, param="messages", code="too_many_media",
            )
