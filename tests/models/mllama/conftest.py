"""Shared fixtures for the Mllama tests: one tiny published-layout checkpoint per session,
our model and transformers' on it (float32), our processor, deterministic images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def mllama_ckpt(tmp_path_factory) -> Path:
    from vlmserve.models.mllama.tiny import make_tiny_mllama

    return make_tiny_mllama(tmp_path_factory.mktemp("tiny_mllama"), seed=0)


@pytest.fixture(scope="session")
def mllama_models(mllama_ckpt):
    from transformers import MllamaForConditionalGeneration as HFMllama

    from vlmserve.models.loader import load_model

    ours, _ = load_model(mllama_ckpt, dtype=torch.float32, device="cpu", progress=False)
    hf = HFMllama.from_pretrained(mllama_ckpt, dtype=torch.float32).eval()
    return ours, hf


@pytest.fixture(scope="session")
def mllama_processor(mllama_ckpt):
    from vlmserve.models.mllama.processor import MllamaProcessor

    return MllamaProcessor(mllama_ckpt, json.loads((mllama_ckpt / "config.json").read_text()))


def random_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
