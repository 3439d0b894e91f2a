"""Fixtures of the kernel tests. The root conftest has set TRITON_INTERPRET=1 on a machine
without CUDA, so the kernels run in Triton's interpreter on CPU tensors; on a GPU the same
tests run compiled on CUDA tensors."""

from __future__ import annotations

import pytest
import torch

# Absolute / relative tolerances against the float32 PyTorch references. fp16/bf16 round
# inputs, intermediate casts (e.g. attention probabilities before the PV dot) and outputs.
_TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def tol():
    """tol(dtype) -> dict(atol=, rtol=) for torch.testing.assert_close."""

    def get(dtype: torch.dtype, scale: float = 1.0) -> dict:
        atol, rtol = _TOLERANCES[dtype]
        return {"atol": atol * scale, "rtol": rtol * scale}

    return get


@pytest.fixture
def poisoned():
    """poisoned(shape, dtype, device) -> a NaN-filled tensor (integers: -1), so any element a
    kernel fails to write makes the comparison fail."""

    def make(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    return make
