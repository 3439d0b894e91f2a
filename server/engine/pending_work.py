"""Counters of the work still queued: pending prefill tokens and encoder rows (plain Python).

Owner: the `Scheduler`, which reports them in `SchedulerStats` every step (the /v1/load and
/metrics autoscaling signals). They are kept up to date on the events that change them —
a request enters the waiting queue (arrival, preemption), its computed tokens advance, it
leaves (finish, abort, failure), an encoder output enters or leaves the encoder cache — so
a step costs O(what it scheduled), not O(everything queued).

Definitions (what a recount over every queued request would give):
- prefill tokens: a waiting request's `num_tokens` (a preempted one recomputes everything),
  plus a running one's prompt tokens not yet computed;
- encoder rows: the `encoder_rows` of every item of a waiting or running request whose
  placeholder range is not wholly computed yet (`offset + length > num_computed_tokens`) and
  whose content hash is not in the encoder cache.
"""

from __future__ import annotations

from collections.abc import Callable

from vlmserve.engine.request import Request


class PendingWork:
    def __init__(self, is_cached: Callable[[str], bool]) -> None:
        self._is_cached = is_cached
        self.prefill_tokens = 0
        self.encoder_rows = 0
        self._tokens: dict[str, int] = {}  # req id -> its part of prefill_tokens
        self._unpassed: dict[str, list[int]] = {}  # req id -> its items not yet computed past
        self._rows_by_hash: dict[str, int] = {}  # content hash -> rows of unpassed items

    # ---- request events --------------------------------------------------------------------

    def waiting(self, request: Request) -> None:
        """The request is (back) in the waiting queue, nothing computed."""
        self._set_tokens(request, request.num_tokens)
        for i in self._unpassed.pop(request.request_id, ()):
            self._drop_item(request, i)
        unpassed = [i for i, item in enumerate(request.mm_items) if item.offset + item.length > request.num_computed_tokens]
        for i in unpassed:
            self._add_item(request, i)
        if unpassed:
            self._unpassed[request.request_id] = unpassed

    def running(self, request: Request) -> None:
        """The request runs and its `num_computed_tokens` may have advanced."""
        self._set_tokens(request, max(0, request.num_prompt_tokens - request.num_computed_tokens))
        unpassed = self._unpassed.get(request.request_id)
        if not unpassed:
            return
        done = request.num_computed_tokens
        left = []
        for i in unpassed:
            item = request.mm_items[i]
            if item.offset + item.length > done:
                left.append(i)
            else:
                self._drop_item(request, i)
        if left:
            self._unpassed[request.request_id] = left
        else:
            del self._unpassed[request.request_id]

    def leave(self, request: Request) -> None:
        self.prefill_tokens -= self._tokens.pop(request.request_id, 0)
        for i in self._unpassed.pop(request.request_id, ()):
            self._drop_item(request, i)

    # ---- encoder cache events --------------------------------------------------------------

    def cache_changed(self, content_hash: str, cached: bool) -> None:
        rows = self._rows_by_hash.get(content_hash, 0)
        self.encoder_rows += -rows if cached else rows

    # ---- internals -------------------------------------------------------------------------

    def _set_tokens(self, request: Request, n: int) -> None:
        self.prefill_tokens += n - self._tokens.get(request.request_id, 0)
        self._tokens[request.request_id] = n

    def _add_item(self, request: Request, i: int) -> None:
        item = request.mm_items[i]
        self._rows_by_hash[item.content_hash] = self._rows_by_hash.get(item.content_hash, 0) + item.encoder_rows
        if not self._is_cached(item.content_hash):
            self.encoder_rows += item.encoder_rows

    def _drop_item(self, request: Request, i: int) -> None:
        item = request.mm_items[i]
        left = self._rows_by_hash[item.content_hash] - item.encoder_rows
        if left:
            self._rows_by_hash[item.content_hash] = left
        else:
            del self._rows_by_hash[item.content_hash]
        if not self._is_cached(item.content_hash):
            self.encoder_rows -= item.encoder_rows
