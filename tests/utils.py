"""Helpers for tests that run the real engine: offline LLMs, deterministic images, chats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_llm(model_dir: Path, **overrides):
    from server.config import EngineConfig
    from server.engine.llm import LLM

    base = dict(model=str(model_dir), num_kv_blocks=512, block_size=16, max_model_len=2048, kernel_backend="torch")
    base.update(overrides)
    return LLM(EngineConfig(**base))


def image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth-ish content (not pure noise), so resizing is exercised meaningfully.
    base = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


def user(*parts) -> dict:
    content = [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}
