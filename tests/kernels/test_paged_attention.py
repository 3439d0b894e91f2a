import pytest
import torch

from vlmserve.kernels import reference
from vlmserve.kernels.paged_attention import choose_num_splits, paged_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _paged_batch(seq_lens, query_lens, hq, hkv, d, block_size, dtype, device):
    """A step of mixed requests; each request's blocks are a shuffled, non-contiguous draw
    from the pool, and unused block-table slots are 0 (as ForwardBatch pads them)."""
    blocks_per_req = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 5
    perm = torch.randperm(num_blocks)[: sum(blocks_per_req)]
    table = torch.zeros(len(seq_lens), max(blocks_per_req), dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks_per_req):
        table[i, :n] = perm[at:at + n]
        at += n
    k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    q = torch.randn(sum(query_lens), hq, d, dtype=dtype, device=device)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return q, k_cache, v_cache, table.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device), qsl


# (seq_lens, query_lens): a decode, a fresh prefill, a partial prefill chunk whose context
# spans several blocks, a length-1 sequence.
MIXED = ([23, 9, 37, 1], [1, 9, 6, 1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,block_size", [(2, 2, 64, 16), (4, 1, 80, 4), (8, 2, 128, 8)])
def test_paged_attention_mixed_prefill_and_decode(hq, hkv, d, block_size, dtype, device, tol, poisoned):
    seq_lens, query_lens = MIXED
    q, kc, vc, bt, sl, qsl = _paged_batch(seq_lens, query_lens, hq, hkv, d, block_size, dtype, device)
    args = (q, kc, vc, bt, sl, qsl, max(query_lens), max(seq_lens), d ** -0.5)
    got = paged_attention(*args, out=poisoned(q.shape, dtype, device), num_splits=1)
    torch.testing.assert_close(got, reference.paged_attention(*args), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [2, 3])
def test_paged_attention_split_k_matches_reference(num_splits, dtype, device, tol, poisoned):
    # Long-ish contexts at small batch. Splits take BLOCK_N-aligned key ranges, so the
    # 17-key request leaves its third split empty (interpreter BLOCK_N = 16).
    seq_lens, query_lens = [70, 45, 17], [1, 3, 1]
    q, kc, vc, bt, sl, qsl = _paged_batch(seq_lens, query_lens, 4, 1, 64, 16, dtype, device)
    args = (q, kc, vc, bt, sl, qsl, max(query_lens), max(seq_lens), 0.125)
    got = paged_attention(*args, out=poisoned(q.shape, dtype, device), num_splits=num_splits)
    torch.testing.assert_close(got, reference.paged_attention(*args), **tol(dtype))


def test_paged_attention_skips_request_without_queries(device, tol):
    # A request scheduled with no tokens this step (empty query range) must not disturb others.
    q, kc, vc, bt, sl, qsl = _paged_batch([12, 5, 30], [2, 0, 4], 2, 1, 64, 4, torch.float32, device)
    args = (q, kc, vc, bt, sl, qsl, 4, 30, 0.125)
    torch.testing.assert_close(paged_attention(*args), reference.paged_attention(*args), **tol(torch.float32))


def test_paged_attention_reads_only_the_request_blocks(device):
    # Garbage in blocks no request owns must not reach the output.
    q, kc, vc, bt, sl, qsl = _paged_batch([10, 3], [2, 1], 2, 2, 64, 4, torch.float32, device)
    args = (q, kc, vc, bt, sl, qsl, 2, 10, 0.125)
    before = paged_attention(*args)
    unused = torch.ones(kc.shape[0], dtype=torch.bool)
    unused[bt[0, :3].long()] = False
    unused[bt[1, :1].long()] = False
    kc[unused.to(kc.device)] = float("nan")
    vc[unused.to(kc.device)] = float("nan")
    torch.testing.assert_close(paged_attention(*args), before, atol=0, rtol=0)


def test_split_heuristic_splits_long_small_batches_only():
    cfg = {"split_min_seq_len": 2048, "target_programs": 264, "min_keys_per_split": 256, "max_splits": 16}
    assert choose_num_splits(1, 4, 1, 8192, cfg) == 16
    assert choose_num_splits(256, 4, 1, 8192, cfg) == 1
    assert choose_num_splits(1, 4, 1, 512, cfg) == 1
    assert choose_num_splits(8, 4, 1, 2048, cfg) == 8


def test_paged_attention_rejects_wrong_block_table_rows(device):
    q, kc, vc, bt, sl, qsl = _paged_batch([5, 6], [1, 1], 2, 2, 64, 4, torch.float32, device)
    with pytest.raises(ValueError, match="block_tables must be"):
        paged_attention(q, kc, vc, bt[:1], sl, qsl, 1, 6, 0.125)
