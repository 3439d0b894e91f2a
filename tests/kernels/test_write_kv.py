import pytest
import torch

from vlmserve.kernels import reference
from vlmserve.kernels.write_kv import write_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,head_dim,block_size", [(1, 1, 64, 16), (13, 4, 80, 4), (30, 2, 128, 8)])
def test_write_kv_scatters_to_shuffled_slots(tokens, heads, head_dim, block_size, dtype, device):
    num_blocks = tokens // block_size + 3
    k = torch.randn(tokens, heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(tokens, heads, head_dim, dtype=dtype, device=device)
    # Distinct slots spread over shuffled blocks; untouched slots stay NaN in both results.
    slots = torch.randperm(num_blocks * block_size, device=device)[:tokens].to(torch.int64)
    shape = (num_blocks, block_size, heads, head_dim)
    kc, vc = torch.full(shape, float("nan"), dtype=dtype, device=device), torch.full(shape, float("nan"), dtype=dtype, device=device)
    want_k, want_v = kc.clone(), vc.clone()
    reference.write_kv(k, v, want_k, want_v, slots)
    write_kv(k, v, kc, vc, slots)
    torch.testing.assert_close(kc, want_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(vc, want_v, atol=0, rtol=0, equal_nan=True)
    assert not torch.isnan(kc.view(-1, heads, head_dim)[slots]).any()


def test_write_kv_reads_strided_views_of_fused_qkv(device):
    # k and v as views of one [T, (Hq + 2 Hk) * D] buffer, as a fused qkv projection gives.
    tokens, hq, hk, d = 5, 4, 2, 64
    qkv = torch.randn(tokens, (hq + 2 * hk) * d, device=device)
    k = qkv[:, hq * d:(hq + hk) * d].view(tokens, hk, d)
    v = qkv[:, (hq + hk) * d:].view(tokens, hk, d)
    kc = torch.randn(3, 4, hk, d, device=device)
    vc = torch.randn(3, 4, hk, d, device=device)
    want_k, want_v = kc.clone(), vc.clone()
    slots = torch.tensor([11, 0, 5, 6, 2], device=device)
    reference.write_kv(k, v, want_k, want_v, slots)
    write_kv(k, v, kc, vc, slots)
    torch.testing.assert_close(kc, want_k, atol=0, rtol=0)
    torch.testing.assert_close(vc, want_v, atol=0, rtol=0)


def test_write_kv_rejects_cache_head_mismatch(device):
    k = torch.randn(2, 2, 64, device=device)
    cache = torch.zeros(2, 4, 3, 64, device=device)
    with pytest.raises(ValueError, match="caches must both be"):
        write_kv(k, k, cache, cache, torch.tensor([0, 1], device=device))
