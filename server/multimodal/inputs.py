"""The multimodal contract between a family processor and the engine.

Owner: `server/models/<family>/processor.py` builds these; the scheduler reads only the
plain fields (`content_hash`, `offset`, `length`, `num_embeds`); the model runner hands
`data` to `Model.embed_multimodal`. `data` holds CPU tensors or numpy arrays (uint8 or
float pixels, grid metadata) and is never read by the scheduler or cache managers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MultiModalItem:
    """One image (or video) of a prompt, after the family processor.

    The item owns the prompt range `[offset, offset + length)`. Within that range,
    `is_embed` (None: every position) marks the positions that receive one row of the
    encoder output each, in order; the others keep their token embedding (Pixtral's
    `[IMG_BREAK]`, Molmo's `<im_col>`). `num_embeds` rows come out of the encoder.
    """

    modality: str  # "image" | "video"
    content_hash: str  # hash of the pixels and of every processor setting that shapes them
    offset: int
    length: int
    data: dict[str, Any]  # family-specific encoder inputs (CPU)
    is_embed: np.ndarray | None = None  # bool [length]
    # Cross-attention families (Mllama): rows this item adds to the request's cross-attention
    # K/V sequence (it places no rows inline: its is_embed is all False).
    cross_attn_tokens: int = 0

    @property
    def encoder_rows(self) -> int:
        """Rows `embed_multimodal` returns for this item (what the encoder cache holds)."""
        return self.cross_attn_tokens or self.num_embeds

    @property
    def num_embeds(self) -> int:
        return self.length if self.is_embed is None else int(self.is_embed.sum())

    def embeds_before(self, pos: int) -> int:
        """Rows of the encoder output that belong to prompt positions < `pos`."""
        rel = min(max(pos - self.offset, 0), self.length)
        if self.is_embed is None:
            return rel
        return int(self.is_embed[:rel].sum())


@dataclass
class ProcessedPrompt:
    """A chat turned into engine input by a family processor.

    `mrope_positions` ([3, len(prompt_token_ids)] int64) is set by families with M-RoPE
    (Qwen2-VL); a generated token at sequence index i then has position i + mrope_delta
    on all three axes. Other families use 1-D positions 0..n-1.
    """

    prompt_token_ids: list[int]
    mm_items: list[MultiModalItem] = field(default_factory=list)  # sorted by offset
    mrope_positions: np.ndarray | None = None
    mrope_delta: int = 0
    prompt_text: str | None = None
    # Cross-attention families: for each prompt token, the [start, end) range of the request's
    # cross-attention K/V sequence (the items' rows, concatenated in item order) it attends
    # to; start == end marks a token that attends to no image. Generated tokens use the
    # last prompt token's range. int32 [len(prompt_token_ids), 2].
    cross_ranges: np.ndarray | None = None
    # Cross-attention families: where each row of the items' encoder outputs (concatenated in
    # item order) goes in the request's cross K/V sequence; None: row r at position r.
    # int64 [sum of cross_attn_tokens].
    cross_row_positions: np.ndarray | None = None
