"""Which encoder outputs one chunk of a request needs, and taking them (plain Python; no torch).

Owner: the Scheduler, once per request per step: `plan_encoder` (no side effects) decides how
far the chunk may go, `commit_encoder` takes what the plan promised from the
`EncoderCacheManager` once the chunk also got its KV blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vlmserve.engine.encoder_cache_manager import EncoderCacheManager
from vlmserve.engine.request import Request


@dataclass
class EncoderPlan:
    """What one chunk needs from the encoder cache; nothing is taken until `commit_encoder`."""

    num_new_tokens: int
    to_encode: list[int] = field(default_factory=list)  # input ids to allocate and encode
    hits: list[int] = field(default_factory=list)  # input ids already cached: take a reference
    # Same image twice in one prompt: the later copy hits the entry the first allocates.
    deferred_hits: list[int] = field(default_factory=list)
    num_rows: int = 0  # rows to encode (the step's encoder budget)
    num_pinned_rows: int = 0  # rows of unreferenced entries the hits take out of the evictable


def plan_encoder(
    cache: EncoderCacheManager, request: Request, start: int, num_new_tokens: int, budget: int, all_items: bool = False
) -> EncoderPlan:
    """Which items the chunk [start, start + num_new_tokens) needs encoded, shortening
    the chunk to end before the first item that cannot be encoded this step.

    Items already cached become hits; items wholly before `start` (prefix-cache hits,
    earlier chunks) are skipped. No side effects: the plan is taken by `commit_encoder`.
    Rows reserved so far (to encode, and of unreferenced entries the hits pin) are never
    counted as evictable for a later item, so the commit cannot run out of rows."""
    plan = EncoderPlan(num_new_tokens)
    end = start + num_new_tokens
    planned: set[str] = set()  # hashes this plan encodes
    pinned: set[str] = set()  # hashes this plan references
    for i, item in enumerate(request.mm_items):
        if not all_items:
            if item.offset >= end:
                break
            if item.offset + item.length <= start:
                continue
        content_hash = item.content_hash
        reserved = plan.num_rows + plan.num_pinned_rows
        if content_hash in planned:
            plan.deferred_hits.append(i)
        elif cache.holds(request, i):
            pass
        elif cache.contains(content_hash) and (
            content_hash in pinned
            or reserved + cache.num_rows_pinned_by_hit(request, i) <= cache.num_freeable_rows
        ):
            if content_hash not in pinned:
                plan.num_pinned_rows += cache.num_rows_pinned_by_hit(request, i)
                pinned.add(content_hash)
            plan.hits.append(i)
        elif not cache.contains(content_hash) and cache.can_allocate(
            request, i, budget - plan.num_rows, num_reserved_rows=reserved
        ):
            plan.to_encode.append(i)
            plan.num_rows += item.encoder_rows
            planned.add(content_hash)
        else:
            # The chunk stops before the item; 0 tokens when it is already inside it, or
            # when every item must be encoded now.
            plan.num_new_tokens = 0 if all_items else max(0, item.offset - start)
            break
    return plan


def commit_encoder(
    cache: EncoderCacheManager, request: Request, plan: EncoderPlan, encoder_inputs: dict[str, list[int]]
) -> None:
    """Takes the plan: references for the hits, rows for the items to encode (which the
    runner encodes this step: `encoder_inputs[req_id]`)."""
    # Hits first: pinned, their entries cannot be evicted by the allocations below.
    for i in plan.hits:
        cache.has_cache(request, i)
    for i in plan.to_encode:
        cache.allocate(request, i)
    for i in plan.deferred_hits:
        cache.has_cache(request, i)
    if plan.to_encode:
        encoder_inputs[request.request_id] = list(plan.to_encode)
