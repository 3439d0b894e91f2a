import pytest
import torch

from vlmserve.kernels import reference
from vlmserve.kernels.rotary import rotary

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cos_sin(tokens, head_dim, dtype, device):
    # Real RoPE angles at random positions, so cos/sin are never trivially 1/0.
    pos = torch.randint(0, 4096, (tokens, 1), device=device).float()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    ang = pos * inv_freq
    return ang.cos().to(dtype), ang.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hq,hk,head_dim", [(1, 4, 4, 64), (7, 8, 2, 80), (5, 4, 1, 128)])
def test_rotary_rotates_q_and_k_in_place(tokens, hq, hk, head_dim, dtype, device, tol):
    q = torch.randn(tokens, hq, head_dim, dtype=dtype, device=device)
    k = torch.randn(tokens, hk, head_dim, dtype=dtype, device=device)
    cos, sin = _cos_sin(tokens, head_dim, torch.float32, device)
    want_q, want_k = q.clone(), k.clone()
    reference.rotary(want_q, want_k, cos, sin)
    rotary(q, k, cos, sin)
    torch.testing.assert_close(q, want_q, **tol(dtype))
    torch.testing.assert_close(k, want_k, **tol(dtype))


def test_rotary_on_views_of_fused_qkv_leaves_v_untouched(device, tol):
    tokens, hq, hk, d = 6, 4, 2, 80
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, dtype=torch.float16, device=device)
    v_before = qkv[:, (hq + hk) * d:].clone()
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    cos, sin = _cos_sin(tokens, d, torch.float16, device)
    want_q, want_k = q.clone(), k.clone()
    reference.rotary(want_q, want_k, cos, sin)
    rotary(q, k, cos, sin)
    torch.testing.assert_close(q, want_q, **tol(torch.float16))
    torch.testing.assert_close(k, want_k, **tol(torch.float16))
    torch.testing.assert_close(qkv[:, (hq + hk) * d:], v_before, atol=0, rtol=0)


def test_rotary_rejects_wrong_cos_shape(device):
    q = torch.randn(3, 2, 64, device=device)
    with pytest.raises(ValueError, match=r"cos must be \[T, D/2\]"):
        rotary(q, q.clone(), torch.ones(3, 64, device=device), torch.ones(3, 32, device=device))
