"""`kernels.cross_attention` (reference): each query attends to its range of its request's
paged rows; an empty range attends to all of them; a request without rows gets zeros."""

from __future__ import annotations

import torch

from vlmserve import kernels
from vlmserve.kernels.reference import cross_attention


def _dense(q, k, v, scale):
    """q [Lq, Hq, D], k/v [S, Hk, D] → plain softmax attention [Lq, Hq, D]."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    probs = torch.softmax(torch.einsum("qhd,shd->hqs", q, k) * scale, dim=-1)
    return torch.einsum("hqs,shd->qhd", probs, v)


def test_ranges_empty_ranges_and_requests_without_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    block, hq, hk, d = 4, 4, 2, 8
    k_cache, v_cache = torch.randn(12, block, hk, d, generator=gen), torch.randn(12, block, hk, d, generator=gen)
    tables = torch.tensor([[7, 2, 9], [0, 0, 0], [11, 5, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([10, 0, 6], dtype=torch.int32)
    # request 0: 3 queries, request 1 (no rows): 2, request 2: 2
    qsl = torch.tensor([0, 3, 5, 7], dtype=torch.int32)
    ranges = torch.tensor([[2, 7], [0, 0], [9, 10], [0, 0], [0, 0], [0, 6], [3, 3]], dtype=torch.int32)
    q = torch.randn(7, hq, d, generator=gen)
    scale = d**-0.5

    out = kernels.cross_attention(q, k_cache, v_cache, tables, seq_lens, ranges, qsl, scale)

    def rows(cache, req):
        return cache[tables[req].long()].flatten(0, 1)[: int(seq_lens[req])]

    k0, v0, k2, v2 = rows(k_cache, 0), rows(v_cache, 0), rows(k_cache, 2), rows(v_cache, 2)
    torch.testing.assert_close(out[0:1], _dense(q[0:1], k0[2:7], v0[2:7], scale))
    torch.testing.assert_close(out[1:2], _dense(q[1:2], k0, v0, scale))  # empty: all 10 rows
    torch.testing.assert_close(out[2:3], _dense(q[2:3], k0[9:10], v0[9:10], scale))
    assert torch.equal(out[3:5], torch.zeros_like(out[3:5]))
    torch.testing.assert_close(out[5:7], _dense(q[5:7], k2, v2, scale))


def test_range_outside_the_request_rows_is_rejected() -> None:
    q = torch.randn(1, 2, 4)
    cache = torch.randn(2, 4, 2, 4)
    bad = torch.tensor([[0, 5]], dtype=torch.int32)
    try:
        cross_attention(q, cache, cache, torch.tensor([[0]], dtype=torch.int32), torch.tensor([4], dtype=torch.int32),
                        bad, torch.tensor([0, 1], dtype=torch.int32), 0.5)
    except ValueError as e:
        assert "outside" in str(e)
    else:
        raise AssertionError("a range past seq_len must raise")
