"""EncoderCacheManager: references per request, lazy eviction, freed-hash reporting."""

from __future__ import annotations

import numpy as np
import pytest

from vlmserve.engine.encoder_cache_manager import EncoderCacheManager
from vlmserve.engine.request import Request
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt


def make_request(req_id: str, *images: tuple[str, int]) -> Request:
    """One placeholder range per (content_hash, num_embeds), back to back after 2 text tokens."""
    items, offset = [], 2
    for content_hash, n in images:
        items.append(MultiModalItem("image", content_hash, offset, n, data={}))
        offset += n
    prompt = ProcessedPrompt(prompt_token_ids=[1] * (offset + 1), mm_items=items)
    return Request(req_id, prompt, SamplingParams())


def test_allocated_entry_is_a_hit_for_another_request_and_counted() -> None:
    cache = EncoderCacheManager(cache_size=100)
    a, b = make_request("a", ("img", 10)), make_request("b", ("img", 10))
    assert not cache.has_cache(a, 0)
    assert cache.can_allocate(a, 0, encoder_budget_left=100)
    cache.allocate(a, 0)
    assert cache.has_cache(b, 0)
    assert (cache.queries, cache.hits) == (2, 1)
    assert cache.num_free_rows == 90
    # Asking again for an input the request already holds is not another query.
    assert cache.has_cache(b, 0)
    assert (cache.queries, cache.hits) == (2, 1)


def test_unreferenced_entry_stays_cached_for_a_later_turn() -> None:
    cache = EncoderCacheManager(cache_size=100)
    turn1 = make_request("turn1", ("img", 10))
    cache.allocate(turn1, 0)
    cache.free(turn1)
    assert cache.get_freed_hashes() == []
    turn2 = make_request("turn2", ("img", 10))
    assert cache.has_cache(turn2, 0)
    assert cache.num_free_rows == 90


def test_eviction_happens_only_under_pressure_oldest_released_first_reported_once() -> None:
    cache = EncoderCacheManager(cache_size=30)
    reqs = [make_request(f"r{i}", (f"img{i}", 10)) for i in range(3)]
    for r in reqs:
        cache.allocate(r, 0)
    cache.free(reqs[1])
    cache.free(reqs[0])  # released after img1: evicted after it
    assert cache.num_free_rows == 0 and cache.num_freeable_rows == 20
    new = make_request("new", ("img3", 10))
    assert cache.can_allocate(new, 0, encoder_budget_left=10)
    cache.allocate(new, 0)
    assert cache.get_freed_hashes() == ["img1"]
    assert cache.get_freed_hashes() == []
    assert cache.contains("img0") and not cache.contains("img1")


def test_referenced_entries_are_never_evicted() -> None:
    cache = EncoderCacheManager(cache_size=20)
    cache.allocate(make_request("a", ("imgA", 15)), 0)
    b = make_request("b", ("imgB", 10))
    assert not cache.can_allocate(b, 0, encoder_budget_left=100)
    with pytest.raises(RuntimeError, match="call can_allocate first"):
        cache.allocate(b, 0)


def test_can_allocate_respects_step_budget_and_reserved_rows() -> None:
    cache = EncoderCacheManager(cache_size=20)
    r = make_request("r", ("img0", 8), ("img1", 8), ("img2", 8))
    assert not cache.can_allocate(r, 0, encoder_budget_left=7)
    assert cache.can_allocate(r, 1, encoder_budget_left=8, num_reserved_rows=8)
    # Two planned items already claim 16 of 20 rows.
    assert not cache.can_allocate(r, 2, encoder_budget_left=100, num_reserved_rows=16)


def test_same_image_twice_in_one_prompt_keeps_the_entry_referenced_until_both_pass() -> None:
    cache = EncoderCacheManager(cache_size=10)
    r = make_request("r", ("img", 10), ("img", 10))
    cache.allocate(r, 0)
    assert cache.has_cache(r, 1)
    cache.free_encoder_input(r, 0)
    assert cache.num_freeable_rows == 0  # input 1 still needs it
    cache.free_encoder_input(r, 1)
    assert cache.num_freeable_rows == 10
    assert cache.held_input_ids(r) == []


def test_free_drops_every_reference_of_the_request() -> None:
    cache = EncoderCacheManager(cache_size=30)
    r = make_request("r", ("a", 10), ("b", 10))
    other = make_request("other", ("b", 10))
    cache.allocate(r, 0)
    cache.allocate(r, 1)
    cache.has_cache(other, 0)
    cache.free(r)
    assert cache.held_input_ids(r) == []
    assert cache.num_freeable_rows == 20  # "b" is still needed by `other`


def test_entry_evicted_and_reallocated_before_reporting_is_not_reported() -> None:
    cache = EncoderCacheManager(cache_size=10)
    first = make_request("first", ("img", 10))
    cache.allocate(first, 0)
    cache.free(first)
    filler = make_request("filler", ("other", 10))
    cache.allocate(filler, 0)  # evicts "img"
    cache.free(filler)
    again = make_request("again", ("img", 10))
    cache.allocate(again, 0)  # evicts "other", brings "img" back
    assert cache.get_freed_hashes() == ["other"]


def test_rows_follow_num_embeds_not_the_placeholder_length() -> None:
    cache = EncoderCacheManager(cache_size=10)
    item = MultiModalItem(
        "image", "pix", 0, 6, data={}, is_embed=np.array([1, 1, 0, 1, 1, 0], dtype=bool)
    )
    r = Request("r", ProcessedPrompt([7] * 7, [item]), SamplingParams())
    cache.allocate(r, 0)
    assert cache.num_free_rows == 6
