"""Tiny Pixtral checkpoints shared by the Pixtral tests: the same seed written in both on-disk
formats (`server/models/pixtral/tiny.py`), so both hold the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmserve.models.pixtral.tiny import make_tiny_pixtral


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pixtral(tmp_path_factory.mktemp("pixtral_hf"), seed=0, format="hf")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pixtral(tmp_path_factory.mktemp("pixtral_mistral"), seed=0, format="mistral")


def random_image(height: int, width: int, seed: int) -> Image.Image:
    """Smooth random content (a blurred noise field), so resampling filters differ visibly."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), dtype=np.uint8)
    noise = rng.integers(-20, 21, (height, width, 3))
    base = np.asarray(Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BILINEAR), dtype=np.int64)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


# name -> (conversation, image sizes (h, w)); the tiny checkpoints' longest edge is 256 px.
CHATS = {
    "one_image": (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this picture."}]}],
        [(40, 56)],
    ),
    "two_images": (
        [{"role": "user", "content": [
            {"type": "text", "text": "Compare"}, {"type": "image"},
            {"type": "text", "text": "with"}, {"type": "image"}, {"type": "text", "text": "What differs?"},
        ]}],
        [(48, 32), (30, 70)],
    ),
    "text_only": ([{"role": "user", "content": "Hello, who are you?"}], []),
    "odd_size": (  # 333 x 517 is fitted into 256 px: floor (HF) and round (Mistral) differ
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        [(333, 517)],
    ),
    "tiny_image": (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}],
        [(5, 7)],
    ),
    "multi_turn": (
        [
            {"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
            {"role": "assistant", "content": "It is red."},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
        ],
        [(64, 64), (20, 90)],
    ),
}


def chat_images(name: str) -> list[Image.Image]:
    return [random_image(h, w, seed=i) for i, (h, w) in enumerate(CHATS[name][1])]
