import importlib

import pytest
import torch

from vlmserve import kernels
from vlmserve.kernels import reference

OPS = ["rms_norm", "silu_and_mul", "rotary", "varlen_attention", "write_kv", "paged_attention",
       "merge_embeddings", "normalize_patchify"]


@pytest.fixture
def triton_backend():
    previous = kernels.get_backend()
    kernels.set_backend("triton")
    yield
    kernels.set_backend(previous)


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_picks_the_triton_launcher_for_cpu_tensors(op, triton_backend):
    launcher = getattr(importlib.import_module(f"vlmserve.kernels.{op}"), op)
    assert kernels._impl(op, torch.zeros(1)) is launcher
    # Importing kernels.<op> must leave the package's dispatcher in place.
    assert callable(getattr(kernels, op)) and getattr(kernels, op).__module__ == "vlmserve.kernels"


def test_dispatched_rms_norm_launches_the_triton_kernel(triton_backend, monkeypatch, tol):
    module = importlib.import_module("vlmserve.kernels.rms_norm")
    real, grids = module._rms_norm_kernel, []

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(module, "_rms_norm_kernel", Spy())
    x, w, r = torch.randn(5, 64), torch.rand(64), torch.randn(5, 64)
    out, summed = kernels.rms_norm(x, w, 1e-6, r)
    assert len(grids) == 1
    want, want_sum = reference.rms_norm(x, w, 1e-6, r)
    torch.testing.assert_close(out, want, **tol(torch.float32))
    torch.testing.assert_close(summed, want_sum, **tol(torch.float32))


def test_auto_backend_uses_the_reference_on_cpu():
    assert kernels.get_backend() == "auto"
    assert kernels._impl("paged_attention", torch.zeros(1)) is reference.paged_attention
