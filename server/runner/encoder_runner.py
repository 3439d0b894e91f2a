"""Runs the vision encoder for the items a step schedules and holds the outputs.

The EncoderCacheManager (scheduler side, no torch) decides what is encoded and when an
entry may be dropped; this class holds the tensors, keyed by content hash, on the model's
device: [num_embeds, hidden] per item.
"""

from __future__ import annotations

import torch

from vlmserve.models.interfaces import VLModel
from vlmserve.multimodal.inputs import MultiModalItem


class EncoderRunner:
    def __init__(self, model: VLModel) -> None:
        self.model = model
        self.cache: dict[str, torch.Tensor] = {}
        self.num_encoder_calls = 0
        self.num_encoded_items = 0

    def free(self, hashes: list[str]) -> None:
        for h in hashes:
            self.cache.pop(h, None)

    def encode(self, items: list[MultiModalItem]) -> None:
        """Encode every item not already held, all in one call (one varlen batch)."""
        todo: dict[str, MultiModalItem] = {}
        for item in items:
            if item.content_hash not in self.cache:
                todo.setdefault(item.content_hash, item)
        if not todo:
            return
        outputs = self.model.embed_multimodal(list(todo.values()))
        for (h, item), out in zip(todo.items(), outputs):
            if out.shape[0] != item.encoder_rows:
                raise RuntimeError(f"encoder returned {out.shape[0]} rows for an item that needs {item.encoder_rows}")
            self.cache[h] = out
        self.num_encoder_calls += 1
        self.num_encoded_items += len(todo)

    def rows(self, content_hash: str, start: int, end: int) -> torch.Tensor:
        try:
            return self.cache[content_hash][start:end]
        except KeyError:
            raise RuntimeError(f"encoder output {content_hash[:12]} is needed but was never computed") from None
