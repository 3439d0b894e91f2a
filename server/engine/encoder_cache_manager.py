"""Which encoder outputs the runner holds, keyed by content hash (plain Python; no torch).

Owner: the Scheduler. The runner keeps the tensors (`content_hash -> [num_embeds, hidden]`);
this object mirrors that map in rows so the scheduler can bound it by `cache_size`.

An entry is referenced by every request that still needs it: a request needs item i until
its `num_computed_tokens` passes `offset + length`. An entry nobody references stays cached
(a later turn of a chat sends the same image again) and is evicted, least recently
released first, only when a new entry needs its rows; evicted hashes are reported once
through `get_freed_hashes()` so the runner can drop the tensors.

Lifecycle per (request, input): `has_cache` (hit: take a reference) or `can_allocate` →
`allocate` (the runner encodes it this step); then `free_encoder_input`, or `free` for all.

Planning a chunk is side-effect free: the scheduler asks `can_allocate` for each new item and
`num_rows_pinned_by_hit` for each hit, passing the rows it already plans to allocate *or pin*
as `num_reserved_rows` — a hit on an unreferenced entry takes that entry out of the evictable
rows, so counting it as evictable for an earlier new item of the same chunk would promise rows
that `allocate` cannot free. Only then does it take the hits' references and allocate.
"""

from __future__ import annotations

from collections import OrderedDict

from vlmserve.engine.request import Request


class EncoderCacheManager:
    def __init__(self, cache_size: int) -> None:
        if cache_size < 1:
            raise ValueError(f"encoder cache_size must be at least 1 row, got {cache_size}")
        self.cache_size = cache_size
        self._rows: dict[str, int] = {}  # every cached entry -> its num_embeds
        self._refs: dict[str, set[str]] = {}  # content hash -> ids of requests needing it
        self._unreferenced: OrderedDict[str, None] = OrderedDict()  # eviction order, front first
        self._num_used_rows = 0
        self._num_unreferenced_rows = 0
        self._req_inputs: dict[str, set[int]] = {}  # req id -> input ids it holds refs for
        self._freed: list[str] = []
        # In items; a (request, input) pair is counted once per admission.
        self.queries = 0
        self.hits = 0
        self._queried: dict[str, set[int]] = {}

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_rows(self) -> int:
        return self.cache_size - self._num_used_rows

    @property
    def num_freeable_rows(self) -> int:
        """Free rows plus the rows of entries nobody references (evictable)."""
        return self.num_free_rows + self._num_unreferenced_rows

    def contains(self, content_hash: str) -> bool:
        return content_hash in self._rows

    def holds(self, request: Request, input_id: int) -> bool:
        """Whether the request holds a reference for its item `input_id`."""
        return input_id in self._req_inputs.get(request.request_id, ())

    def held_input_ids(self, request: Request) -> list[int]:
        return sorted(self._req_inputs.get(request.request_id, ()))

    def num_rows_pinned_by_hit(self, request: Request, input_id: int) -> int:
        """Rows that `has_cache` for this cached item would take out of the evictable rows:
        the entry's rows if nobody references it yet, else 0. No side effects."""
        content_hash = request.mm_items[input_id].content_hash
        if self.holds(request, input_id) or self._refs.get(content_hash):
            return 0
        return self._rows.get(content_hash, 0)

    # ---- lifecycle -----------------------------------------------------------------------

    def has_cache(self, request: Request, input_id: int) -> bool:
        """True if the item's encoder output is cached; the request then holds a reference."""
        if self.holds(request, input_id):
            return True
        content_hash = request.mm_items[input_id].content_hash
        queried = self._queried.setdefault(request.request_id, set())
        first_query = input_id not in queried
        queried.add(input_id)
        if first_query:
            self.queries += 1
        if content_hash not in self._rows:
            return False
        if first_query:
            self.hits += 1
        self._add_ref(request, input_id, content_hash)
        return True

    def can_allocate(
        self,
        request: Request,
        input_id: int,
        encoder_budget_left: int,
        num_reserved_rows: int = 0,
    ) -> bool:
        """Whether the item can be encoded this step: within the step's remaining encoder
        budget, and within the cache once unreferenced entries are evicted.
        `num_reserved_rows` are rows the caller plans to allocate before this one, plus the
        rows of unreferenced entries it plans to reference (`num_rows_pinned_by_hit`)."""
        num_rows = request.mm_items[input_id].encoder_rows
        return (
            num_rows <= encoder_budget_left
            and num_rows + num_reserved_rows <= self.num_freeable_rows
        )

    def allocate(self, request: Request, input_id: int) -> None:
        """Reserves rows for the item's output (the runner encodes it this step), evicting
        unreferenced entries, least recently released first."""
        item = request.mm_items[input_id]
        content_hash, num_rows = item.content_hash, item.encoder_rows
        if content_hash in self._rows:
            raise RuntimeError(
                f"encoder output {content_hash!r} is already cached; call has_cache first"
            )
        if num_rows > self.num_freeable_rows:
            raise RuntimeError(
                f"encoder output of {num_rows} rows does not fit: {self.num_freeable_rows} of "
                f"{self.cache_size} rows can be freed; call can_allocate first"
            )
        while self.num_free_rows < num_rows:
            self._evict_one()
        self._rows[content_hash] = num_rows
        self._num_used_rows += num_rows
        self._refs[content_hash] = set()
        if content_hash in self._freed:
            # Evicted and re-encoded before the runner heard of the eviction: it keeps one copy.
            self._freed.remove(content_hash)
        queried = self._queried.setdefault(request.request_id, set())
        if input_id not in queried:  # a miss the caller did not ask `has_cache` about
            queried.add(input_id)
            self.queries += 1
        self._add_ref(request, input_id, content_hash)

    def free_encoder_input(self, request: Request, input_id: int) -> None:
        """Drops the request's reference for one item; the entry stays cached."""
        req_id = request.request_id
        inputs = self._req_inputs.get(req_id)
        if not inputs or input_id not in inputs:
            return
        inputs.discard(input_id)
        content_hash = request.mm_items[input_id].content_hash
        # One prompt may hold the same image twice: keep the ref while either is needed.
        if any(request.mm_items[i].content_hash == content_hash for i in inputs):
            return
        refs = self._refs[content_hash]
        refs.discard(req_id)
        if not refs:
            self._unreferenced[content_hash] = None
            self._num_unreferenced_rows += self._rows[content_hash]

    def free(self, request: Request) -> None:
        """Drops every reference of the request (finish, abort or preemption)."""
        for input_id in self.held_input_ids(request):
            self.free_encoder_input(request, input_id)
        self._req_inputs.pop(request.request_id, None)
        self._queried.pop(request.request_id, None)

    def get_freed_hashes(self) -> list[str]:
        """Hashes evicted since the last call, each reported once."""
        freed, self._freed = self._freed, []
        return freed

    # ---- internals -----------------------------------------------------------------------

    def _add_ref(self, request: Request, input_id: int, content_hash: str) -> None:
        refs = self._refs[content_hash]
        if not refs and content_hash in self._unreferenced:
            del self._unreferenced[content_hash]
            self._num_unreferenced_rows -= self._rows[content_hash]
        refs.add(request.request_id)
        self._req_inputs.setdefault(request.request_id, set()).add(input_id)

    def discard(self, content_hash: str) -> None:
        """Forgets an unreferenced entry now (its rows were never written: the step that was
        to encode it failed); the runner hears of it through `get_freed_hashes`."""
        if content_hash in self._unreferenced:
            del self._unreferenced[content_hash]
            self._evict(content_hash)

    def _evict_one(self) -> None:
        content_hash, _ = self._unreferenced.popitem(last=False)
        self._evict(content_hash)

    def _evict(self, content_hash: str) -> None:
        """Drops an entry already taken out of `_unreferenced`."""
        num_rows = self._rows.pop(content_hash)
        del self._refs[content_hash]
        self._num_used_rows -= num_rows
        self._num_unreferenced_rows -= num_rows
        self._freed.append(content_hash)
