"""The Molmo golden fixtures (`../shared/fixtures/golden/molmo`, beside the repo root): the
official remote code's outputs on a tiny checkpoint in the real on-disk format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

GOLDEN = Path(__file__).resolve().parents[3] / ".." / "shared" / "fixtures" / "golden" / "molmo"
CHECKPOINT = GOLDEN / "checkpoint"


def golden_dir() -> Path:
    if not (CHECKPOINT / "config.json").is_file():
        pytest.fail(f"the Molmo golden fixtures are missing: expected them at {GOLDEN.resolve()}")
    return GOLDEN


def cases() -> list[dict]:
    return json.loads((golden_dir() / "inputs" / "conversations.json").read_text())["cases"]


def case_image(case: dict) -> Image.Image:
    return Image.open(golden_dir() / "inputs" / case["image"])


def case_processor(case: dict) -> dict[str, np.ndarray]:
    return dict(np.load(golden_dir() / "golden" / f"{case['name']}_processor.npz"))


def case_outputs(case: dict):
    return load_file(str(golden_dir() / "golden" / f"{case['name']}_outputs.safetensors"))


def case_conversation(case: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": case["text"]}]}]


def summary() -> dict:
    return json.loads((golden_dir() / "golden" / "summary.json").read_text())
