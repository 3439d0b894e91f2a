"""Fixtures shared across the test tree: tiny Qwen2-VL checkpoints in the published HF
layout, made once per session by `make_tiny_qwen2_vl`."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt_factory(tmp_path_factory):
    from vlmserve.models.qwen2_vl.tiny import make_tiny_qwen2_vl

    cache: dict[int, Path] = {}

    def make(seed: int = 0) -> Path:
        if seed not in cache:
            cache[seed] = make_tiny_qwen2_vl(tmp_path_factory.mktemp(f"tiny_qwen2_vl_{seed}"), seed=seed)
        return cache[seed]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_ckpt_factory) -> Path:
    return tiny_ckpt_factory(0)


@pytest.fixture(autouse=True)
def _restore_kernel_backend():
    """Building an engine sets the process-wide kernel backend; give each test the default."""
    from vlmserve import kernels

    kernels.set_backend("auto")
    yield
    kernels.set_backend("auto")
