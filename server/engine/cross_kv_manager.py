"""Cross-attention K/V blocks of cross-attention families (Mllama); plain Python, no torch.

Owner: the Scheduler. A request with images gets all its blocks at admission — enough for
the rows of every item (`MultiModalItem.cross_attn_tokens`), which the runner writes once
— and keeps them until it finishes or is preempted. Text-only requests take none. No
prefix caching here: the rows are cheap to rewrite from the encoder cache.
"""

from __future__ import annotations

from vlmserve.engine.block_pool import BlockPool
from vlmserve.engine.request import Request


class CrossKVManager:
    def __init__(self, block_size: int, num_blocks: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching=False)
        self._req_blocks: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @staticmethod
    def num_rows(request: Request) -> int:
        return sum(item.cross_attn_tokens for item in request.mm_items)

    def num_blocks_needed(self, request: Request) -> int:
        return -(-self.num_rows(request) // self.block_size)

    def can_allocate(self, request: Request) -> bool:
        return request.request_id in self._req_blocks or self.num_blocks_needed(request) <= self.pool.num_free_blocks

    def allocate(self, request: Request) -> list[int]:
        """The request's blocks, allocated on the first call; [] for a text-only request."""
        blocks = self._req_blocks.get(request.request_id)
        if blocks is None:
            blocks = self.pool.get_new_blocks(self.num_blocks_needed(request))
            self._req_blocks[request.request_id] = blocks
        return blocks

    def free(self, request: Request) -> None:
        blocks = self._req_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(blocks)

    def get_block_ids(self, req_id: str) -> list[int]:
        return self._req_blocks.get(req_id, [])
