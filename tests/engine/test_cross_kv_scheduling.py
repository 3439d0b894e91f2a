"""Cross-attention families (Mllama): the scheduler's per-request cross K/V pool."""

from __future__ import annotations

import numpy as np
import pytest

from vlmserve.config import EngineConfig
from vlmserve.engine.request import Request, RequestStatus
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.engine.scheduler import Scheduler
from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt
from tests.engine.test_scheduler import run_step

IMAGE_TOKEN = 5


def cross_request(req_id: str, n: int, images: list[tuple[str, int, int]], max_tokens: int = 3) -> Request:
    """images: (content_hash, offset of its <|image|> token, cross rows)."""
    ids = [100 + i for i in range(n)]
    items = []
    for h, off, rows in images:
        ids[off] = IMAGE_TOKEN
        items.append(MultiModalItem("image", h, off, 1, {}, is_embed=np.zeros(1, bool), cross_attn_tokens=rows))
    prompt = ProcessedPrompt(ids, items, cross_ranges=np.zeros((n, 2), np.int32))
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def make(num_cross_blocks=10, **cfg):
    cfg.setdefault("block_size", 4)
    return Scheduler(EngineConfig(**cfg), num_kv_blocks=64, max_model_len=256, num_cross_kv_blocks=num_cross_blocks)


def test_admission_takes_cross_blocks_for_every_image_and_text_only_takes_none():
    s = make()
    s.add_request(cross_request("img", 12, [("a", 2, 9), ("b", 6, 4)]))
    s.add_request(cross_request("txt", 8, []))
    out = s.schedule()
    by_id = {r.req_id: r for r in out.scheduled_new_reqs}
    assert len(by_id["img"].cross_block_ids) == 4  # 13 rows in blocks of 4
    assert by_id["txt"].cross_block_ids == []
    assert s.cross_kv.num_free_blocks == 6


def test_every_image_is_encoded_at_admission_even_beyond_the_first_chunk():
    s = make(max_num_batched_tokens=4)
    s.add_request(cross_request("img", 20, [("a", 1, 3), ("b", 15, 3)]))
    out = s.schedule()
    assert out.num_scheduled_tokens == {"img": 4}
    assert out.scheduled_encoder_inputs == {"img": [0, 1]}


def test_a_request_whose_images_together_exceed_the_encoder_budget_is_refused_at_admission():
    # Each image fits, both together do not: admitted, it would head the queue forever.
    s = make(max_encoder_tokens_per_step=5, encoder_cache_size=8)
    with pytest.raises(ValueError, match=r"need 6 encoder rows together .* at most 5 fit .*"
                                         r"--max-encoder-tokens-per-step"):
        s.add_request(cross_request("img", 10, [("a", 1, 3), ("b", 5, 3)]))
    assert not s.has_unfinished_requests()
    # The same image twice is encoded once: 3 rows, admitted and served.
    s.add_request(cross_request("twice", 10, [("a", 1, 3), ("a", 5, 3)], max_tokens=1))
    s.add_request(cross_request("next", 10, [("c", 1, 5)], max_tokens=1))
    for _ in range(10):
        if not s.has_unfinished_requests():
            break
        run_step(s)
    assert not s.has_unfinished_requests()
    assert s.cross_kv.num_free_blocks == 10


def test_a_request_whose_images_wait_for_encoder_rows_runs_once_they_are_released():
    s = make(max_encoder_tokens_per_step=8, encoder_cache_size=8, max_num_batched_tokens=4)
    s.add_request(cross_request("first", 12, [("a", 1, 3), ("b", 10, 3)], max_tokens=1))
    s.add_request(cross_request("second", 6, [("c", 1, 6)], max_tokens=1))
    out, _ = run_step(s)
    assert set(out.num_scheduled_tokens) == {"first"}  # "first" holds 6 of 8 rows
    seen = set()
    for _ in range(10):
        out, _ = run_step(s)
        seen |= set(out.scheduled_encoder_inputs)
        if not s.has_unfinished_requests():
            break
    assert seen == {"second"} and not s.has_unfinished_requests()


def test_cross_blocks_are_freed_at_finish_and_at_preemption():
    s = make()
    s.add_request(cross_request("img", 6, [("a", 0, 8)], max_tokens=2))
    while s.has_unfinished_requests():
        run_step(s)
    assert s.cross_kv.num_free_blocks == 10

    s = make()
    req = cross_request("img", 6, [("a", 0, 8)])
    s.add_request(req)
    s.schedule()
    assert s.cross_kv.num_free_blocks == 8
    s._preempt(s.running.pop())
    assert req.status == RequestStatus.PREEMPTED
    assert s.cross_kv.num_free_blocks == 10


def test_images_needing_more_rows_than_the_pool_are_rejected_with_both_numbers():
    s = make(num_cross_blocks=2)
    with pytest.raises(ValueError, match="need 9 cross-attention rows but the cross K/V pool holds 8"):
        s.add_request(cross_request("img", 6, [("a", 0, 9)]))


def test_prefix_blocks_before_the_image_token_do_not_match_across_images():
    from vlmserve.engine.kv_cache_manager import block_extra_keys

    a = cross_request("a", 12, [("hash-a", 8, 4)])
    b = cross_request("b", 12, [("hash-b", 8, 4)])
    assert block_extra_keys(a, 0, 4) != block_extra_keys(b, 0, 4)
