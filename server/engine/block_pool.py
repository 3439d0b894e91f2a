"""A pool of fixed-size KV blocks: reference counts, a free queue in eviction order, and
the hash → block map of the prefix cache (plain Python; no torch).

Owner: `KVCacheManager` (the language model's paged self-attention cache). The pool knows
nothing about requests or tokens, so a second pool (Mllama's cross-attention K/V, one
allocation per request) can reuse it with `enable_caching=False`.

Invariants:
- a block is in the free queue iff its ref count is 0;
- a block with a hash is the one block `cached_blocks[hash]` maps to; a free block keeps
  its hash (still a prefix-cache hit) until it is handed out again, then the hash is dropped.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence

# The parent of a request's first block. sha256 never yields 32 zero bytes in practice.
ROOT_PARENT_HASH = bytes(32)


def hash_block_tokens(
    parent_hash: bytes | None,
    token_ids: Sequence[int],
    extra_keys: Sequence[tuple[str, int]] = (),
) -> bytes:
    """sha256 over a length-prefixed encoding of (parent hash, token ids, extra keys).

    `extra_keys` are (multimodal content hash, block start relative to the item offset)
    pairs: the placeholder token ids of two different images are identical, so without
    them a block of image A would serve a request for image B.
    """
    h = hashlib.sha256()
    h.update(ROOT_PARENT_HASH if parent_hash is None else parent_hash)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    h.update(struct.pack("<I", len(extra_keys)))
    for content_hash, start in extra_keys:
        encoded = content_hash.encode("utf-8")
        h.update(struct.pack("<I", len(encoded)))
        h.update(encoded)
        h.update(struct.pack("<q", start))
    return h.digest()


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        tag = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={tag})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least 1 block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Front = evicted first. OrderedDict gives O(1) pop-front, append and removal of a
        # cached block taken out of the middle by a prefix-cache hit.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached_blocks: dict[bytes, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds, cached ones included (they can be evicted)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def get_new_blocks(self, n: int) -> list[int]:
        """Takes `n` blocks from the front of the free queue (ref count 1 each), evicting
        their prefix-cache hashes."""
        if n > len(self._free):
            raise RuntimeError(
                f"asked for {n} KV blocks with {len(self._free)} free; check num_free_blocks first"
            )
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            self._evict_hash(block)
            block.ref_cnt = 1
            ids.append(block_id)
        return ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Adds a reference to blocks found in the prefix cache; a free one leaves the queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1

    def free_blocks(self, block_ids: Iterable[int]) -> None:
        """Drops one reference each, in the given order: blocks reaching 0 join the back of
        the free queue, so the first ones given are evicted first. They keep their hash."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"KV block {block_id} freed more often than allocated")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def get_cached_block(self, block_hash: bytes) -> int | None:
        return self.cached_blocks.get(block_hash)

    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Registers a full block under its hash. Returns False (and leaves the block
        unhashed) when another block already holds the same content: two requests computed
        it in the same step; the first registration stays the shared one."""
        if not self.enable_caching:
            return False
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return block.block_hash == block_hash
        if block_hash in self.cached_blocks:
            return False
        block.block_hash = block_hash
        self.cached_blocks[block_hash] = block_id
        return True

    def uncache_blocks(self, block_ids: Iterable[int]) -> None:
        """Forgets the hashes of these blocks: their contents may be wrong (a failed step
        wrote them), so no later request may match them."""
        for block_id in block_ids:
            self._evict_hash(self.blocks[block_id])

    def reset_prefix_cache(self) -> int:
        """Forgets every hash (blocks in use keep their data, but nothing new matches them).
        Returns how many entries were dropped."""
        n = len(self.cached_blocks)
        for block_id in self.cached_blocks.values():
            self.blocks[block_id].block_hash = None
        self.cached_blocks.clear()
        return n

    def _evict_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            block.block_hash = None
