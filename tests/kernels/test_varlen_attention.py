import pytest
import torch

from vlmserve.kernels import reference
from vlmserve.kernels.varlen_attention import varlen_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(lens, hq, hkv, d, dtype, device):
    total = sum(lens)
    q = torch.randn(total, hq, d, dtype=dtype, device=device)
    k = torch.randn(total, hkv, d, dtype=dtype, device=device)
    v = torch.randn(total, hkv, d, dtype=dtype, device=device)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "lens,hq,hkv,d",
    [
        ([5, 1, 19], 2, 2, 64),  # ragged, a length-1 sequence, GQA 1
        ([17, 9], 4, 1, 80),  # GQA 4, D/2 not a power of two
        ([3, 40], 4, 1, 128),  # a sequence spanning two query and key tiles
    ],
)
def test_varlen_attention_matches_reference(lens, hq, hkv, d, causal, dtype, device, tol, poisoned):
    q, k, v, cu = _inputs(lens, hq, hkv, d, dtype, device)
    scale = d ** -0.5
    out = poisoned(q.shape, dtype, device)
    got = varlen_attention(q, k, v, cu, max(lens), causal, scale, out=out)
    want = reference.varlen_attention(q, k, v, cu, max(lens), causal, scale)
    torch.testing.assert_close(got, want, **tol(dtype))


def test_varlen_attention_keeps_sequences_apart(device, tol):
    # Changing sequence 1's keys must not change sequence 0's output (block-diagonal mask).
    q, k, v, cu = _inputs([6, 6], 2, 2, 64, torch.float32, device)
    first = varlen_attention(q, k, v, cu, 6, False, 0.125)[:6].clone()
    k[6:] += 3.0
    v[6:] -= 3.0
    torch.testing.assert_close(varlen_attention(q, k, v, cu, 6, False, 0.125)[:6], first, atol=0, rtol=0)


def test_varlen_attention_rejects_bad_gqa_ratio(device):
    q = torch.randn(4, 3, 64, device=device)
    k = torch.randn(4, 2, 64, device=device)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        varlen_attention(q, k, k, cu, 4, True, 0.1)
