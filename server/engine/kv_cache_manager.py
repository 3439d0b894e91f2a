"""The paged KV cache of the language model, per request, with prefix caching
(plain Python; no torch).

Owner: the Scheduler. It calls, per admission: `get_computed_blocks` → `allocate_slots`
(with the hits); per step: `allocate_slots`; at finish or preemption: `free`. The runner
only ever sees block ids (in `SchedulerOutput`), never this object.

A request's token i lives in block `block_ids[i // block_size]`, slot `i % block_size`.
A FULL block's hash chains its parent's hash, its token ids and, for every multimodal item
overlapping it, (item.content_hash, block start - item.offset): identical text with a
different image never matches. Chaining also covers Mllama, whose text tokens after an
image depend on the image through cross-attention: every later block inherits the image
block's key through its parent hash.
"""

from __future__ import annotations

from collections.abc import Sequence

from vlmserve.engine.block_pool import BlockPool, hash_block_tokens
from vlmserve.engine.request import Request


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_extra_keys(request: Request, start: int, end: int) -> list[tuple[str, int]]:
    """(content_hash, start - item.offset) for each item overlapping tokens [start, end).

    Cross-attention families: a token's hidden state depends on every image its request
    holds (even tokens before the first image token), so the first block carries all of
    them and the parent chain passes them on."""
    keys = []
    if start == 0:
        keys.extend((item.content_hash, -1) for item in request.mm_items if item.cross_attn_tokens)
    for item in request.mm_items:
        if item.offset >= end:
            break  # mm_items are sorted by offset
        if item.offset + item.length > start:
            keys.append((item.content_hash, start - item.offset))
    return keys


class KVCacheManager:
    def __init__(self, block_size: int, num_blocks: int, enable_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self._req_blocks: dict[str, list[int]] = {}
        # Hashes of the request's full blocks, computed lazily; valid as long as the request
        # lives, since its token list only grows.
        self._req_hashes: dict[str, list[bytes]] = {}
        # How many of the request's leading blocks are registered in the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}
        # In tokens, counted once per admission (vLLM's prefix_cache_queries/hits).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (free cached blocks count as unused)."""
        return self.pool.usage

    def get_block_ids(self, req_id: str) -> list[int]:
        return list(self._req_blocks.get(req_id, ()))

    def num_blocks_for(self, num_tokens: int) -> int:
        return _cdiv(num_tokens, self.block_size)

    # ---- prefix cache --------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest chain of cached full blocks of the request's tokens, and how many
        tokens they hold. No side effects: pass the ids to `allocate_slots` to take them.

        Capped at `num_tokens - 1` tokens: the last token is always recomputed, so the step
        produces logits even when the whole prompt is cached."""
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_blocks)
        hit_ids: list[int] = []
        for block_hash in hashes[:max_blocks]:
            block_id = self.pool.get_cached_block(block_hash)
            if block_id is None:
                break
            hit_ids.append(block_id)
        return hit_ids, len(hit_ids) * self.block_size

    def reset_prefix_cache(self) -> int:
        """Forgets every cached hash; returns how many were dropped."""
        return self.pool.reset_prefix_cache()

    # ---- allocation ----------------------------------------------------------------------

    def can_allocate(
        self, request: Request, num_new_tokens: int, new_computed_block_ids: Sequence[int] = ()
    ) -> bool:
        return self._num_blocks_short(request, num_new_tokens, new_computed_block_ids) <= 0

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_block_ids: Sequence[int] = ()
    ) -> list[int] | None:
        """Ensures blocks for `request.num_computed_tokens + len(new_computed_block_ids) *
        block_size + num_new_tokens` tokens.

        `new_computed_block_ids` are prefix-cache hits from `get_computed_blocks`, given only
        at admission (the request holds no blocks and `num_computed_tokens` is still 0; the
        caller raises it by the hit afterwards). Returns the block ids the request gained,
        hits first, for the runner's block table; None, with nothing changed, when the pool
        is short of blocks."""
        req_id = request.request_id
        held = self._req_blocks.get(req_id)
        if held is not None and not new_computed_block_ids:
            total = request.num_computed_tokens + num_new_tokens
            if self.num_blocks_for(total) <= len(held):  # room in the held blocks (most decodes)
                if self.enable_caching:
                    self._cache_full_blocks(request, min(total, request.num_tokens) // self.block_size)
                return []
        if new_computed_block_ids and (held or request.num_computed_tokens):
            raise ValueError(
                f"request {req_id!r} already holds {len(held or ())} blocks and "
                f"{request.num_computed_tokens} computed tokens; prefix-cache hits can only be "
                "taken at admission"
            )
        if not self.can_allocate(request, num_new_tokens, new_computed_block_ids):
            return None
        num_new_blocks = self._num_blocks_needed(request, num_new_tokens, new_computed_block_ids)

        first_admission = held is None
        if held is None:
            held = self._req_blocks[req_id] = []
            self._num_cached_blocks[req_id] = 0
        self.pool.touch(new_computed_block_ids)
        gained = list(new_computed_block_ids) + self.pool.get_new_blocks(num_new_blocks)
        held.extend(gained)

        num_hit_tokens = len(new_computed_block_ids) * self.block_size
        if self.enable_caching:
            if first_admission:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += num_hit_tokens
            # Hits are registered already; count them so they are not re-hashed.
            self._num_cached_blocks[req_id] += len(new_computed_block_ids)
            total = request.num_computed_tokens + num_hit_tokens + num_new_tokens
            self._cache_full_blocks(request, min(total, request.num_tokens) // self.block_size)
        return gained

    def free(self, request: Request, uncache: bool = False) -> None:
        """Releases the request's blocks (finish, abort or preemption). Tail blocks join the
        free queue first, so they are evicted before the prefix other requests may share.
        `uncache`: also forget their prefix-cache hashes (a failed step may have written them)."""
        req_id = request.request_id
        blocks = self._req_blocks.pop(req_id, None)
        self._req_hashes.pop(req_id, None)
        self._num_cached_blocks.pop(req_id, None)
        if blocks:
            if uncache:
                self.pool.uncache_blocks(blocks)
            self.pool.free_blocks(reversed(blocks))

    # ---- internals -----------------------------------------------------------------------

    def _num_blocks_needed(
        self, request: Request, num_new_tokens: int, new_computed_block_ids: Sequence[int]
    ) -> int:
        total = (
            request.num_computed_tokens
            + len(new_computed_block_ids) * self.block_size
            + num_new_tokens
        )
        held = len(self._req_blocks.get(request.request_id, ()))
        return max(0, self.num_blocks_for(total) - held - len(new_computed_block_ids))

    def _num_blocks_short(
        self, request: Request, num_new_tokens: int, new_computed_block_ids: Sequence[int]
    ) -> int:
        """Blocks missing for the allocation; <= 0 when it fits. Hits on free cached blocks
        leave the free queue when taken, so they do not count as available."""
        needed = self._num_blocks_needed(request, num_new_tokens, new_computed_block_ids)
        free_hits = sum(1 for b in new_computed_block_ids if self.pool.blocks[b].ref_cnt == 0)
        return needed - (self.pool.num_free_blocks - free_hits)

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[bytes]:
        """The hashes of the request's first `num_full_blocks` blocks (all full)."""
        hashes = self._req_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        tokens = None
        while len(hashes) < num_full_blocks:
            if tokens is None:
                tokens = request.all_token_ids
            start = len(hashes) * bs
            parent = hashes[-1] if hashes else None
            hashes.append(
                hash_block_tokens(
                    parent,
                    tokens[start : start + bs],
                    block_extra_keys(request, start, start + bs),
                )
            )
        return hashes

    def _cache_full_blocks(self, request: Request, num_full_blocks: int) -> None:
        """Registers the request's blocks [num_cached, num_full_blocks) under their hashes.
        Safe at schedule time: the runner writes their K/V in this step's forward pass,
        before any later step can read them."""
        req_id = request.request_id
        done = self._num_cached_blocks[req_id]
        num_full_blocks = min(num_full_blocks, len(self._req_blocks[req_id]))
        if num_full_blocks <= done:
            return
        hashes = self._block_hashes(request, num_full_blocks)
        blocks = self._req_blocks[req_id]
        for i in range(done, num_full_blocks):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_cached_blocks[req_id] = num_full_blocks
