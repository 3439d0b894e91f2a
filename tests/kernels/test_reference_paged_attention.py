"""The reference paged attention batches decodes; check it against attention written out
request by request over a gathered contiguous K/V."""

import math

import pytest
import torch

from vlmserve.kernels import reference


def naive(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale):
    out = torch.empty_like(q)
    for i, n in enumerate(seq_lens.tolist()):
        s, e = qsl[i].item(), qsl[i + 1].item()
        if e == s:
            continue
        k = torch.cat([k_cache[b] for b in block_tables[i].tolist()])[:n]
        v = torch.cat([v_cache[b] for b in block_tables[i].tolist()])[:n]
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        for t in range(s, e):
            pos = n - (e - t)  # absolute position of query t: it sees keys 0..pos
            w = torch.softmax(torch.einsum("hd,lhd->hl", q[t], k[: pos + 1]) * scale, -1)
            out[t] = torch.einsum("hl,lhd->hd", w, v[: pos + 1])
    return out


@pytest.mark.parametrize("hq,hk", [(4, 4), (8, 2)])
def test_batched_decodes_and_chunks_equal_per_request_attention(hq, hk):
    torch.manual_seed(0)
    d, bs, nblocks = 16, 4, 40
    k_cache = torch.randn(nblocks, bs, hk, d)
    v_cache = torch.randn(nblocks, bs, hk, d)
    seq_lens = torch.tensor([1, 9, 17, 6, 13], dtype=torch.int32)
    qlens = torch.tensor([1, 1, 5, 6, 1])  # decodes mixed with prefill chunks
    qsl = torch.zeros(6, dtype=torch.int32)
    qsl[1:] = qlens.cumsum(0)
    perm = torch.randperm(nblocks)
    block_tables = torch.zeros(5, 5, dtype=torch.int32)
    used = 0
    for i, n in enumerate(seq_lens.tolist()):
        nb = math.ceil(n / bs)
        block_tables[i, :nb] = perm[used : used + nb]
        used += nb
    q = torch.randn(int(qsl[-1]), hq, d)
    scale = d**-0.5
    got = reference.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, qsl, 6, 17, scale)
    torch.testing.assert_close(got, naive(q, k_cache, v_cache, block_tables, seq_lens, qsl, scale), atol=1e-5, rtol=1e-5)
