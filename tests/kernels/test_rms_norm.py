import pytest
import torch

from vlmserve.kernels import reference
from vlmserve.kernels.rms_norm import rms_norm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 80), (33, 200), (37, 2500)])
def test_rms_norm_matches_reference(rows, hidden, dtype, device, tol, poisoned):
    x = torch.randn(rows, hidden, dtype=dtype, device=device) * 3 + 0.5
    w = torch.rand(hidden, dtype=dtype, device=device) + 0.5
    out = poisoned((rows, hidden), dtype, device)
    got = rms_norm(x, w, 1e-6, out=out)
    assert got is out
    torch.testing.assert_close(got, reference.rms_norm(x, w, 1e-6), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_eps_counts_where_activations_are_small(dtype, device, tol, poisoned):
    # Mean square ~1e-4 against eps 1e-4: a kernel that drops, doubles or misplaces eps is
    # off by tens of percent here (at unit scale eps hides under the tolerance).
    x = torch.randn(9, 128, dtype=dtype, device=device) * 1e-2
    w = torch.rand(128, dtype=dtype, device=device) + 0.5
    out = poisoned((9, 128), dtype, device)
    torch.testing.assert_close(rms_norm(x, w, 1e-4, out=out), reference.rms_norm(x, w, 1e-4), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_fused_residual_returns_normed_sum_and_sum(dtype, device, tol, poisoned):
    # 3-D input with a strided row layout: a slice of a wider buffer.
    base = torch.randn(2, 5, 160, dtype=dtype, device=device)
    x = base[..., :96]
    res = torch.randn(2, 5, 96, dtype=dtype, device=device)
    w = torch.randn(96, dtype=dtype, device=device)
    out, res_out = poisoned(x.shape, dtype, device), poisoned(x.shape, dtype, device)
    got, got_sum = rms_norm(x, w, 1e-5, res, out=out, residual_out=res_out)
    want, want_sum = reference.rms_norm(x, w, 1e-5, res)
    torch.testing.assert_close(got_sum, want_sum, **tol(dtype))
    torch.testing.assert_close(got, want, **tol(dtype))


def test_rms_norm_float32_weight_promotes_output(device, tol):
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=device)
    w = torch.rand(64, dtype=torch.float32, device=device)
    got = rms_norm(x, w, 1e-6)
    want = reference.rms_norm(x, w, 1e-6)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, **tol(torch.bfloat16))


def test_rms_norm_rejects_mismatched_weight(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x, torch.ones(32, device=device), 1e-6)
