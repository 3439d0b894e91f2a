"""Content hashes of media bytes and the decoded-media cache keyed by them.

The hash identifies the raw bytes a client sent, so the same picture sent twice (multi-turn
chats resend every earlier image) is decoded once. 256-bit BLAKE2b: collisions are not a
practical concern, unlike the short hashes that gave peers wrong answers about the wrong
image. Processors that hash pixels plus their own settings for `MultiModalItem.content_hash`
can use `content_hash` with several parts.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any


def content_hash(*parts: bytes | bytearray | memoryview | str) -> str:
    """Hex BLAKE2b-256 of the parts. Each part is length-prefixed, so ("ab", "c") and
    ("a", "bc") hash differently."""
    h = hashlib.blake2b(digest_size=32)
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)  # hashlib releases the GIL for large buffers
    return h.hexdigest()


class ByteLRU:
    """LRU map bounded by the sum of its values' sizes in bytes (not by entry count).

    Not thread-safe: the owner holds a lock around calls. An entry larger than the whole
    capacity is not stored (it would evict everything and then itself).
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be at least 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.size_bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: str, value: Any, nbytes: int) -> None:
        if nbytes > self.capacity_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.size_bytes -= old[1]
        self._entries[key] = (value, nbytes)
        self.size_bytes += nbytes
        while self.size_bytes > self.capacity_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.size_bytes -= evicted
