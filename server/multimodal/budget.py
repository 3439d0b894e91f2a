"""The media memory budget: bytes of media held by requests, from arrival until they finish.

One `MediaBudget` per server (`--max-media-memory-gb`). Each request takes a `MediaHold`,
which keeps one byte count per key ("0:raw", "0:decoded", "pixels", ...): the stage of one
media item it holds at the moment. A key's count moves in two ways:

- `reserve(key, n)`: before the memory is allocated (a fetch, a decode). Refused with
  `MediaMemoryExceeded` when the growth does not fit under the limit; nothing changes then.
- `settle(key, n)`: after the fact, to the actual size (usually a shrink). Never refused: the
  memory exists already, and refusing would not free it. So the held total may pass the limit
  by what settles above its reservation; the next reservations are then refused until it is
  back under.

`release()` drops every key of the hold (request finished, failed, aborted, client gone); it
is idempotent. Thread-safe: decodes reserve from worker threads.

Nothing here imports FastAPI or torch.
"""

from __future__ import annotations

import os
import threading

GiB = 1024**3
# The default budget: this fraction of the memory the process may use (the cgroup limit in a
# container, else physical memory). The rest is for the model's host-side state, the tokenizer,
# the decoded-media LRU (`--media-cache-bytes`), Python and the engine core's own process.
DEFAULT_MEMORY_FRACTION = 0.25


def machine_memory_bytes() -> int:
    """Memory this process may use: the cgroup (v2, then v1) limit when one is set and lower
    than physical memory, else physical memory."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < physical:
            return int(text)
    return physical


def default_media_memory_bytes() -> int:
    return int(machine_memory_bytes() * DEFAULT_MEMORY_FRACTION)


class MediaMemoryExceeded(Exception):
    """A reservation that does not fit. `never_fits`: the request alone needs more than the
    whole budget (a 413, not a 503: retrying cannot help)."""

    def __init__(self, wanted: int, held: int, limit: int, never_fits: bool, setting: str = "") -> None:
        super().__init__(f"media memory: {wanted} more bytes wanted, {held} of {limit} held")
        self.wanted, self.held, self.limit, self.never_fits = wanted, held, limit, never_fits
        self.setting = setting  # how the limit was set, for messages


class MediaBudget:
    def __init__(self, limit_bytes: int, setting: str = "") -> None:
        """`setting`: how the limit was set, quoted in refusals (e.g. "--max-media-memory-gb 2")."""
        if limit_bytes < 1:
            raise ValueError(f"the media memory budget must be at least 1 byte, got {limit_bytes}")
        self.limit = int(limit_bytes)
        self.setting = setting
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes held by all requests now (what the gauge shows)."""
        return self._held

    def hold(self) -> MediaHold:
        return MediaHold(self)

    def _change(self, hold: MediaHold, key: str, nbytes: int, checked: bool) -> None:
        if nbytes < 0:
            raise ValueError(f"{key}: a byte count is never negative, got {nbytes}")
        with self._lock:
            if hold._released:
                return  # a decode that finished after its request ended: nothing to hold
            growth = nbytes - hold._keys.get(key, 0)
            if checked and growth > 0 and self._held + growth > self.limit:
                raise MediaMemoryExceeded(growth, self._held, self.limit,
                                          never_fits=hold._total + growth > self.limit, setting=self.setting)
            self._held += growth
            hold._total += growth
            if nbytes:
                hold._keys[key] = nbytes
            else:
                hold._keys.pop(key, None)

    def _release(self, hold: MediaHold) -> None:
        with self._lock:
            if hold._released:
                return
            hold._released = True
            self._held -= hold._total
            hold._total = 0
            hold._keys.clear()


class MediaHold:
    """One request's share of the budget (see the module docstring)."""

    def __init__(self, budget: MediaBudget) -> None:
        self._budget = budget
        self._keys: dict[str, int] = {}
        self._total = 0
        self._released = False

    @property
    def total(self) -> int:
        return self._total

    def reserve(self, key: str, nbytes: int) -> None:
        self._budget._change(self, key, int(nbytes), checked=True)

    def settle(self, key: str, nbytes: int) -> None:
        self._budget._change(self, key, int(nbytes), checked=False)

    def release(self) -> None:
        self._budget._release(self)
