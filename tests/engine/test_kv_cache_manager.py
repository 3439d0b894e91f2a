"""KVCacheManager and BlockPool: paged allocation, eviction order, image-aware prefix cache."""

from __future__ import annotations

import pytest

from vlmserve.engine.block_pool import hash_block_tokens
from vlmserve.engine.kv_cache_manager import KVCacheManager
from vlmserve.engine.request import Request
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.multimodal.inputs import MultiModalItem, ProcessedPrompt

BS = 4
IMG = 9  # placeholder token id, identical for every image


def make_request(req_id: str, tokens: list[int], items: list[MultiModalItem] = ()) -> Request:
    prompt = ProcessedPrompt(prompt_token_ids=list(tokens), mm_items=list(items))
    return Request(req_id, prompt, SamplingParams(max_tokens=8))


def image(content_hash: str, offset: int, length: int) -> MultiModalItem:
    return MultiModalItem("image", content_hash, offset, length, data={})


def image_prompt(content_hash: str, text: list[int]) -> tuple[list[int], list[MultiModalItem]]:
    """[1, 2] + 6 image placeholders + text: the image spans blocks 0 and 1."""
    return [1, 2] + [IMG] * 6 + text, [image(content_hash, 2, 6)]


def admit(kv: KVCacheManager, request: Request) -> list[int]:
    """What the scheduler does for a whole prompt: hits, then the rest in one chunk."""
    hits, num_hit = kv.get_computed_blocks(request)
    blocks = kv.allocate_slots(request, request.num_tokens - num_hit, hits)
    assert blocks is not None
    request.num_computed_tokens = request.num_tokens
    return blocks


def test_allocate_rounds_up_to_whole_blocks_and_free_returns_all() -> None:
    kv = KVCacheManager(BS, num_blocks=8)
    req = make_request("a", list(range(10)))
    blocks = kv.allocate_slots(req, 10)
    assert blocks is not None and len(blocks) == 3
    assert kv.get_block_ids("a") == blocks
    assert kv.num_free_blocks == 5
    assert kv.usage == pytest.approx(3 / 8)
    kv.free(req)
    assert kv.num_free_blocks == 8 and kv.get_block_ids("a") == []


def test_allocate_slots_returns_only_the_new_blocks_as_a_diff() -> None:
    kv = KVCacheManager(BS, num_blocks=8)
    req = make_request("a", list(range(6)))
    first = kv.allocate_slots(req, 6)
    req.num_computed_tokens = 6
    req.output_token_ids.extend([100, 101])
    assert kv.allocate_slots(req, 1) == []  # token 6 fits in block 1
    req.num_computed_tokens = 7
    second = kv.allocate_slots(req, 1)  # token 7 still fits
    assert second == []
    req.num_computed_tokens = 8
    req.output_token_ids.append(102)
    third = kv.allocate_slots(req, 1)
    assert third is not None and len(third) == 1
    assert kv.get_block_ids("a") == first + third


def test_allocation_that_does_not_fit_returns_none_and_changes_nothing() -> None:
    kv = KVCacheManager(BS, num_blocks=3)
    kv.allocate_slots(make_request("a", list(range(8))), 8)
    big = make_request("b", list(range(100, 108)))
    assert kv.allocate_slots(big, 8) is None
    assert kv.num_free_blocks == 1
    assert kv.get_block_ids("b") == []


def test_free_queues_tail_blocks_first_so_they_are_evicted_first() -> None:
    kv = KVCacheManager(BS, num_blocks=4)
    req = make_request("a", list(range(16)))
    blocks = kv.allocate_slots(req, 16)
    kv.free(req)
    taken = kv.allocate_slots(make_request("b", list(range(50, 54))), 4)
    assert taken == [blocks[-1]]


def test_same_image_and_text_prefix_hits_and_shares_blocks() -> None:
    kv = KVCacheManager(BS, num_blocks=16)
    tokens, items = image_prompt("img-A", [3, 4, 5, 6, 7])
    a = make_request("a", tokens, items)
    a_blocks = admit(kv, a)
    b = make_request("b", tokens, items)
    hits, num_hit = kv.get_computed_blocks(b)
    # 13 tokens: blocks 0..2 are full and cached; the cap leaves token 12 to compute.
    assert hits == a_blocks[:3] and num_hit == 12
    b_blocks = kv.allocate_slots(b, b.num_tokens - num_hit, hits)
    assert b_blocks[:3] == a_blocks[:3]
    assert b_blocks[3] != a_blocks[3]
    assert [kv.pool.blocks[i].ref_cnt for i in a_blocks] == [2, 2, 2, 1]


def test_same_text_with_another_image_never_hits() -> None:
    kv = KVCacheManager(BS, num_blocks=16)
    tokens, items_a = image_prompt("img-A", [3, 4, 5, 6, 7])
    admit(kv, make_request("a", tokens, items_a))
    _, items_b = image_prompt("img-B", [3, 4, 5, 6, 7])
    hits, num_hit = kv.get_computed_blocks(make_request("b", tokens, items_b))
    # Block 0 holds [1, 2, IMG, IMG]: the image reaches into it, so even it misses.
    assert hits == [] and num_hit == 0


def test_text_only_prefix_before_an_image_is_shared_across_images() -> None:
    kv = KVCacheManager(BS, num_blocks=16)
    text = [1, 2, 3, 4, 5, 6, 7, 8]
    a = make_request("a", text + [IMG] * 4 + [20], [image("img-A", 8, 4)])
    admit(kv, a)
    b = make_request("b", text + [IMG] * 4 + [20], [image("img-B", 8, 4)])
    hits, num_hit = kv.get_computed_blocks(b)
    assert hits == kv.get_block_ids("a")[:2] and num_hit == 8


def test_same_image_at_another_position_within_the_block_misses() -> None:
    kv = KVCacheManager(BS, num_blocks=16)
    tokens = [IMG] * 8 + [5]
    admit(kv, make_request("a", tokens, [image("img-A", 0, 8)]))
    # Same ids, same image, but the item starts one token later: block 0 covers other rows.
    hits, _ = kv.get_computed_blocks(make_request("b", tokens, [image("img-A", 1, 7)]))
    assert hits == []


def test_whole_prompt_hit_is_capped_so_the_last_token_is_computed() -> None:
    kv = KVCacheManager(BS, num_blocks=16)
    tokens = list(range(8))  # exactly 2 full blocks
    admit(kv, make_request("a", tokens))
    hits, num_hit = kv.get_computed_blocks(make_request("b", tokens))
    assert len(hits) == 1 and num_hit == 4  # block 1 recomputed: 8 - 1 tokens cap at 1 block


def test_freed_blocks_stay_hittable_until_reused_then_lose_their_hash() -> None:
    kv = KVCacheManager(BS, num_blocks=3)
    tokens = list(range(9))
    a = make_request("a", tokens)
    a_blocks = admit(kv, a)
    old_hashes = {kv.pool.blocks[i].block_hash for i in a_blocks[:2]}
    kv.free(a)
    hits, num_hit = kv.get_computed_blocks(make_request("b", tokens))
    assert hits == a_blocks[:2] and num_hit == 8
    # Another request takes every block: the old hashes are evicted with them.
    kv.allocate_slots(make_request("c", list(range(50, 62))), 12)
    assert not old_hashes & set(kv.pool.cached_blocks)
    assert all(kv.pool.blocks[i].block_hash not in old_hashes for i in a_blocks)
    assert kv.get_computed_blocks(make_request("d", tokens)) == ([], 0)


def test_hit_on_a_free_cached_block_counts_as_free_and_leaves_the_free_queue() -> None:
    kv = KVCacheManager(BS, num_blocks=3)
    tokens = list(range(9))
    a = make_request("a", tokens)
    a_blocks = admit(kv, a)
    kv.free(a)
    b = make_request("b", tokens)
    hits, num_hit = kv.get_computed_blocks(b)
    # 3 free blocks; the 2 hits are among them, so exactly 1 more may be taken.
    assert kv.allocate_slots(b, 1 + 4, hits) is None
    blocks = kv.allocate_slots(b, 1, hits)
    assert blocks[:2] == a_blocks[:2] and len(blocks) == 3
    assert kv.num_free_blocks == 0


def test_hits_are_taken_only_at_admission() -> None:
    kv = KVCacheManager(BS, num_blocks=8)
    tokens = list(range(9))
    admit(kv, make_request("a", tokens))
    b = make_request("b", tokens)
    admit(kv, b)
    with pytest.raises(ValueError, match="only be taken at admission"):
        kv.allocate_slots(b, 1, kv.get_block_ids("a")[:1])


def test_prefix_cache_counters_are_in_tokens_and_counted_once_per_admission() -> None:
    kv = KVCacheManager(BS, num_blocks=16)
    tokens = list(range(10))
    admit(kv, make_request("a", tokens))
    admit(kv, make_request("b", tokens))
    assert kv.prefix_cache_queries == 20
    assert kv.prefix_cache_hits == 8


def test_blocks_filled_by_decoded_tokens_are_registered() -> None:
    kv = KVCacheManager(BS, num_blocks=8)
    a = make_request("a", [1, 2, 3])
    admit(kv, a)
    a.output_token_ids.append(4)  # token 3 completes block 0 when it is computed
    kv.allocate_slots(a, 1)
    a.num_computed_tokens = 4
    a.output_token_ids.append(5)
    # A resumed copy (prompt + outputs) finds block 0.
    again = make_request("again", [1, 2, 3, 4, 5])
    assert kv.get_computed_blocks(again) == (kv.get_block_ids("a")[:1], 4)


def test_only_tokens_already_known_are_hashed() -> None:
    kv = KVCacheManager(BS, num_blocks=8)
    a = make_request("a", [1, 2, 3, 4, 5, 6])
    # Blocks for 8 tokens (lookahead) but only 6 are known: block 1 must stay unhashed.
    kv.allocate_slots(a, 8)
    assert len(kv.pool.cached_blocks) == 1


def test_reset_prefix_cache_and_disabled_caching_never_hit() -> None:
    kv = KVCacheManager(BS, num_blocks=8)
    tokens = list(range(9))
    admit(kv, make_request("a", tokens))
    assert kv.reset_prefix_cache() == 2
    assert kv.get_computed_blocks(make_request("b", tokens)) == ([], 0)

    off = KVCacheManager(BS, num_blocks=8, enable_caching=False)
    admit(off, make_request("a", tokens))
    assert off.get_computed_blocks(make_request("b", tokens)) == ([], 0)
    assert off.pool.cached_blocks == {}


def test_block_hash_depends_on_parent_tokens_and_image_keys() -> None:
    base = hash_block_tokens(None, [1, 2, 3, 4], [("img-A", 0)])
    assert base == hash_block_tokens(None, [1, 2, 3, 4], [("img-A", 0)])
    assert len(base) == 32
    others = {
        hash_block_tokens(None, [1, 2, 3, 4], [("img-B", 0)]),
        hash_block_tokens(None, [1, 2, 3, 4], [("img-A", 4)]),
        hash_block_tokens(None, [1, 2, 3, 4], []),
        hash_block_tokens(base, [1, 2, 3, 4], [("img-A", 0)]),
        hash_block_tokens(None, [1, 2, 3, 5], [("img-A", 0)]),
        # Length-prefixed: a hash string cannot swallow the next key's bytes.
        hash_block_tokens(None, [1, 2, 3, 4], [("img-A", 0), ("", 0)]),
    }
    assert base not in others and len(others) == 6
