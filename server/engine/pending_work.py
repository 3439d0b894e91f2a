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
  whose content hash is not in the encoder cache;
- work by modality (token-equivalents, the autoscaling signal's split): an item's LM
  positions not yet computed plus its pending encoder rows count for its modality ("image"
  or "video"), every other pending prefill token for "text"; the three sum to prefill tokens
  plus encoder rows;
- output budgets: the sum of `max_tokens` over waiting requests, and over all of them (the
  slot-wait estimate of `load_stats.py`).
"""

from __future__ import annotations

from collections.abc import Callable

from vlmserve.engine.request import Request


class PendingWork:
    def __init__(self, is_cached: Callable[[str], bool]) -> None:
        self._is_cached = is_cached
        self.prefill_tokens = 0
        self.encoder_rows = 0
        self.media_positions = {"image": 0, "video": 0}  # LM positions of unpassed items left
        self.media_rows = {"image": 0, "video": 0}  # encoder_rows, by modality
        self.waiting_budget = 0  # sum of max_tokens over waiting requests
        self.total_budget = 0  # ... over waiting and running ones
        self.num_tracked = 0
        self._tokens: dict[str, int] = {}  # req id -> its part of prefill_tokens
        self._unpassed: dict[str, list[int]] = {}  # req id -> its items not yet computed past
        self._positions: dict[str, dict[str, int]] = {}  # req id -> its part of media_positions
        self._rows_by_hash: dict[str, int] = {}  # content hash -> rows of unpassed items
        self._modality: dict[str, str] = {}  # content hash -> "image" | "video", while tracked
        self._waiting: set[str] = set()

    def work_by_modality(self) -> tuple[int, int, int]:
        """(text, image, video) token-equivalents of the pending work."""
        image = self.media_positions["image"] + self.media_rows["image"]
        video = self.media_positions["video"] + self.media_rows["video"]
        text = self.prefill_tokens - self.media_positions["image"] - self.media_positions["video"]
        return max(0, text), image, video

    # ---- request events --------------------------------------------------------------------

    def waiting(self, request: Request) -> None:
        """The request is (back) in the waiting queue, nothing computed."""
        rid = request.request_id
        if rid not in self._tokens:
            self.num_tracked += 1
            self.total_budget += request.sampling_params.max_tokens
        if rid not in self._waiting:
            self._waiting.add(rid)
            self.waiting_budget += request.sampling_params.max_tokens
        self._set_tokens(request, request.num_tokens)
        for i in self._unpassed.pop(rid, ()):
            self._drop_item(request, i)
        unpassed = [i for i, item in enumerate(request.mm_items) if item.offset + item.length > request.num_computed_tokens]
        for i in unpassed:
            self._add_item(request, i)
        if unpassed:
            self._unpassed[rid] = unpassed
        self._set_positions(request, unpassed)

    def running(self, request: Request) -> None:
        """The request runs and its `num_computed_tokens` may have advanced."""
        if request.request_id in self._waiting:
            self._waiting.discard(request.request_id)
            self.waiting_budget -= request.sampling_params.max_tokens
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
        self._set_positions(request, left)

    def leave(self, request: Request) -> None:
        rid = request.request_id
        if rid in self._tokens:
            self.num_tracked -= 1
            self.total_budget -= request.sampling_params.max_tokens
        if rid in self._waiting:
            self._waiting.discard(rid)
            self.waiting_budget -= request.sampling_params.max_tokens
        self.prefill_tokens -= self._tokens.pop(rid, 0)
        for i in self._unpassed.pop(rid, ()):
            self._drop_item(request, i)
        self._set_positions(request, ())

    # ---- encoder cache events --------------------------------------------------------------

    def cache_changed(self, content_hash: str, cached: bool) -> None:
        rows = self._rows_by_hash.get(content_hash, 0)
        self.encoder_rows += -rows if cached else rows
        if rows:
            self.media_rows[self._modality[content_hash]] += -rows if cached else rows

    # ---- internals -------------------------------------------------------------------------

    def _set_tokens(self, request: Request, n: int) -> None:
        self.prefill_tokens += n - self._tokens.get(request.request_id, 0)
        self._tokens[request.request_id] = n

    def _set_positions(self, request: Request, unpassed) -> None:
        """Recount the request's media positions left over its unpassed items (few per request)."""
        old = self._positions.pop(request.request_id, None)
        if old:
            for modality, n in old.items():
                self.media_positions[modality] -= n
        if not unpassed:
            return
        done = request.num_computed_tokens
        new = {"image": 0, "video": 0}
        for i in unpassed:
            item = request.mm_items[i]
            new[_modality(item)] += item.offset + item.length - max(item.offset, done)
        for modality, n in new.items():
            self.media_positions[modality] += n
        self._positions[request.request_id] = new

    def _add_item(self, request: Request, i: int) -> None:
        item = request.mm_items[i]
        self._rows_by_hash[item.content_hash] = self._rows_by_hash.get(item.content_hash, 0) + item.encoder_rows
        self._modality[item.content_hash] = _modality(item)
        if not self._is_cached(item.content_hash):
            self.encoder_rows += item.encoder_rows
            self.media_rows[_modality(item)] += item.encoder_rows

    def _drop_item(self, request: Request, i: int) -> None:
        item = request.mm_items[i]
        left = self._rows_by_hash[item.content_hash] - item.encoder_rows
        if left:
            self._rows_by_hash[item.content_hash] = left
        else:
            del self._rows_by_hash[item.content_hash]
            del self._modality[item.content_hash]
        if not self._is_cached(item.content_hash):
            self.encoder_rows -= item.encoder_rows
            self.media_rows[_modality(item)] -= item.encoder_rows


def _modality(item) -> str:
    return "video" if item.modality == "video" else "image"
