from __future__ import annotations

import asyncio

import pytest
from pydantic import TypeAdapter

from vlmserve.api.errors import APIError
from vlmserve.api.protocol import ChatMessage
from vlmserve.api.routes.conversation import MediaRef, load_media, to_hf_conversation
from vlmserve.multimodal.media import MediaError

_MESSAGES = TypeAdapter(list[ChatMessage])


def _convert(messages):
    return to_hf_conversation(_MESSAGES.validate_python(messages))


def test_strings_stay_strings_and_parts_become_hf_parts():
    conv, media = _convert([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is"},
            {"type": "image_url", "image_url": {"url": "data:a", "detail": "high"}},
            {"type": "image_url", "image_url": "data:b"},
            {"type": "video_url", "video_url": {"url": "data:v"}},
        ]},
        {"role": "assistant", "content": None},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ])
    assert conv == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "image"}, {"type": "image"},
                                     {"type": "video"}]},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]
    assert media == [
        MediaRef("image", "data:a", "messages[1].content[1].image_url"),
        MediaRef("image", "data:b", "messages[1].content[2].image_url"),
        MediaRef("video", "data:v", "messages[1].content[3].video_url"),
    ]


@pytest.mark.parametrize("messages, param, words", [
    ([{"role": "function", "content": "x", "name": "f"}], "messages[0].role", "not supported"),
    ([{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}], "messages[0].tool_calls[0].function",
     "function.name"),
    ([{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}], "messages[0].tool_calls", "only assistant"),
    ([{"role": "user", "content": None}], "messages[0].content", "required"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}],
     "messages[0].content[0].type", "'input_audio' is not supported"),
    ([{"role": "system", "content": [{"type": "image_url", "image_url": "data:a"}]}],
     "messages[0].content[0]", "only accepted in user messages"),
])
def test_unsupported_messages_raise_400_with_the_path(messages, param, words):
    with pytest.raises(APIError) as info:
        _convert(messages)
    assert info.value.status_code == 400 and info.value.param == param and words in info.value.message


class _SlowFirstLoader:
    """Loads "img:<name>" URLs; the first one finishes last, "img:bad" fails."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    async def load_image(self, url: str) -> str:
        name = url.split(":", 1)[1]
        if name == "bad":
            raise MediaError("cannot decode image: truncated PNG")
        try:
            await asyncio.sleep(0.05 if name == "first" else (5 if name == "slow" else 0))
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise
        return name


async def test_media_loads_concurrently_and_keeps_prompt_order():
    refs = [MediaRef("image", "img:first", "a"), MediaRef("image", "img:second", "b")]
    images, videos = await load_media(refs, _SlowFirstLoader())  # type: ignore[arg-type]
    assert images == ["first", "second"] and videos == []


async def test_a_failed_load_cancels_the_others_and_names_the_part():
    loader = _SlowFirstLoader()
    refs = [MediaRef("image", "img:slow", "messages[0].content[0].image_url"),
            MediaRef("image", "img:bad", "messages[0].content[1].image_url")]
    with pytest.raises(APIError) as info:
        await load_media(refs, loader)  # type: ignore[arg-type]
    assert info.value.message == "messages[0].content[1].image_url: cannot decode image: truncated PNG"
    assert info.value.param == "messages[0].content[1].image_url"
    assert loader.cancelled == ["slow"]


def test_tool_history_becomes_template_tool_calls_with_object_arguments():
    conv, refs = to_hf_conversation([ChatMessage(**m) for m in [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]])
    assert conv[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}}]}
    assert conv[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"} and refs == []
