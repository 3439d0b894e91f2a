"""Molmo's prompt builder beyond the golden cases: chats, several images, text-only, completion
prompts, refusals, and the image items the engine schedules and caches by content."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmserve.models.molmo.processor import MolmoProcessor, conversation_text
from tests.models.molmo.conftest import CHECKPOINT, golden_dir
from tests.utils import image, user


@pytest.fixture(scope="module")
def processor() -> MolmoProcessor:
    golden_dir()
    return MolmoProcessor(CHECKPOINT, json.loads((CHECKPOINT / "config.json").read_text()))


def test_conversation_text_is_the_official_role_format():
    assert conversation_text([user("Describe this image.")]) == " User: Describe this image. Assistant:"
    chat = [user("a", "b"), {"role": "assistant", "content": "c"}, user("d")]
    assert conversation_text(chat) == " User: a b Assistant: c User: d Assistant:"
    assert conversation_text(chat[:2], add_generation_prompt=True) == " User: a b Assistant: c"


def test_images_go_first_in_order_each_with_its_own_blocks(processor):
    a, b = image(64, 48, 1), image(300, 90, 2)
    p = processor.render_chat([user("compare", a, "with", b)], [a, b])
    ids = p.prompt_token_ids
    assert ids[0] == processor.bos_token_id
    first, second = p.mm_items
    assert first.offset == 1 and second.offset == first.offset + first.length
    text = ids[second.offset + second.length :]
    assert text == processor.tokenizer.encode(" User: compare with Assistant:", add_special_tokens=False)
    t = processor.token_ids
    for item in p.mm_items:
        span = np.asarray(ids[item.offset : item.offset + item.length])
        assert span[0] == t["im_start"] and span[-1] == t["im_end"]
        assert (item.is_embed == (span == t["im_patch"])).all()
        assert item.num_embeds == int((item.data["plan"]["feature_rows"] >= 0).sum())
    assert first.content_hash != second.content_hash
    again = processor.render_chat([user(a, "other words")], [a]).mm_items[0]
    assert again.content_hash == first.content_hash  # same pixels, same settings: one encoder entry


def test_refusals_name_the_problem(processor):
    with pytest.raises(ValueError, match="system role"):
        processor.render_chat([{"role": "system", "content": "x"}, user("hi")], [])
    with pytest.raises(ValueError, match="image part"):
        processor.render_chat([user("hi")], [image(20, 20, 0)])
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        processor.render_chat([user("hi")], [], chat_template_kwargs={"x": 1})
    with pytest.raises(ValueError, match="min-pixels"):
        MolmoProcessor(CHECKPOINT, {}, min_pixels=10)


def test_completion_prompts(processor):
    p = processor.render_completion("Hello there")
    assert p.prompt_token_ids == [processor.bos_token_id, *processor.tokenizer.encode("Hello there", add_special_tokens=False)]
    assert processor.render_completion([5, 6]).prompt_token_ids == [5, 6]
    with pytest.raises(ValueError, match="may not contain"):
        processor.render_completion([5, processor.token_ids["im_patch"]])
    with pytest.raises(ValueError, match=r"\[0, 640\)"):
        processor.render_completion([640])
    assert processor.eos_token_ids == [processor.tokenizer.eos_token_id]
    assert processor.generation_defaults() == {"temperature": 0.0}
