import pytest
import torch

from vlmserve.kernels import reference
from vlmserve.kernels.silu_and_mul import silu_and_mul

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 64), (9, 2 * 80), (2, 3, 2 * 300)])
def test_silu_and_mul_matches_reference(shape, dtype, device, tol, poisoned):
    x = torch.randn(shape, dtype=dtype, device=device) * 4
    out = poisoned((*shape[:-1], shape[-1] // 2), dtype, device)
    got = silu_and_mul(x, out=out)
    torch.testing.assert_close(got, reference.silu_and_mul(x), **tol(dtype))


def test_silu_and_mul_reads_strided_rows(device, tol):
    # Rows of a wider buffer: the kernel must honour the row stride, not assume 2I.
    x = torch.randn(6, 200, device=device)[:, :128]
    torch.testing.assert_close(silu_and_mul(x), reference.silu_and_mul(x), **tol(torch.float32))


def test_silu_and_mul_rejects_odd_width(device):
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul(torch.randn(2, 7, device=device))
