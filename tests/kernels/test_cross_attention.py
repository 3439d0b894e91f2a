"""The Triton `cross_attention` against `reference.cross_attention` (tolerances: conftest's
`tol`, i.e. atol = rtol = 2e-5 float32, 2e-3 float16, 1.6e-2 bfloat16), through the
dispatcher, and inside the tiny Mllama (one cross-attention layer, triton vs torch backend)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from vlmserve import kernels
from vlmserve.kernels import reference
from vlmserve.kernels.cross_attention import cross_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cross_batch(seq_lens, ranges_per_req, hq, hkv, d, block_size, dtype, device):
    """Requests with their cross rows in a shuffled, non-contiguous draw of blocks from the
    pool (unused table slots 0, as ForwardBatch pads them); ranges_per_req[i] lists request
    i's query ranges, one [start, end) per query token."""
    blocks_per_req = [(s + block_size - 1) // block_size for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 5
    perm = torch.randperm(num_blocks)[: sum(blocks_per_req)]
    table = torch.zeros(len(seq_lens), max(1, max(blocks_per_req)), dtype=torch.int32)
    at = 0
    for i, n in enumerate(blocks_per_req):
        table[i, :n] = perm[at:at + n]
        at += n
    k_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, dtype=dtype, device=device)
    ranges = torch.tensor([r for rs in ranges_per_req for r in rs], dtype=torch.int32).view(-1, 2)
    q = torch.randn(ranges.shape[0], hq, d, dtype=dtype, device=device)
    qsl = torch.tensor([0] + torch.tensor([len(r) for r in ranges_per_req]).cumsum(0).tolist(), dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    return q, k_cache, v_cache, table.to(device), sl.to(device), ranges.to(device), qsl.to(device)


# Interpreter tiles: 32 keys × 32 rows (launch.json), so full ranges span two key tiles and
# request 2's 34 queries two query tiles even at GQA 1 (five at GQA 4).
# Request 0: 37 rows over 5+ blocks, 7 queries: partial, empty ([0, 0) and [20, 20): all
# rows), last-row, full, tile- and block-straddling ranges. Request 1: no rows (seq_len 0):
# zeros. Request 2: two consecutive images' ranges [0, 9) and [9, 21), and empty ones (the
# prompt before the first image). Request 3: no queries this step.
SEQ_LENS = [37, 0, 21, 6]
RANGES = [
    [[2, 7], [0, 0], [36, 37], [0, 37], [3, 35], [20, 20], [30, 34]],
    [[0, 0], [0, 0]],
    [[0, 0]] * 3 + [[0, 9]] * 14 + [[9, 21]] * 17,
    [],
]
ZERO_ROWS = slice(7, 9)  # request 1's queries


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv,d,block_size", [(2, 2, 64, 4), (4, 1, 64, 8), (2, 2, 80, 8), (8, 2, 80, 4)])
def test_cross_attention_ragged_ranges_match_reference(hq, hkv, d, block_size, dtype, device, tol, poisoned):
    args = (*_cross_batch(SEQ_LENS, RANGES, hq, hkv, d, block_size, dtype, device), d ** -0.5)
    got = cross_attention(*args, out=poisoned(args[0].shape, dtype, device))
    torch.testing.assert_close(got, reference.cross_attention(*args), **tol(dtype))
    assert torch.equal(got[ZERO_ROWS], torch.zeros_like(got[ZERO_ROWS]))  # the seq_len-0 request


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_attention_vision_prefix_ranges_on_strided_views(dtype, device, tol, poisoned):
    # The vision tower's call: q/k/v are views of a fused qkv [N, 3, H, D], each image one
    # block of L rows; real tokens attend to [0, L), padding tokens to [0, real).
    length, heads, d, real = 24, 2, 64, [17, 9]
    qkv = torch.randn(len(real) * length, 3, heads, d, dtype=dtype, device=device)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    k_blocks, v_blocks = k.reshape(-1, length, heads, d), v.reshape(-1, length, heads, d)
    assert not k_blocks.is_contiguous()
    n = len(real)
    pos = torch.arange(length).unsqueeze(0)
    end = torch.where(pos < torch.tensor(real).unsqueeze(1), length, torch.tensor(real).unsqueeze(1).expand(-1, length))
    ranges = torch.stack([torch.zeros_like(end), end], dim=-1).view(-1, 2).to(torch.int32).to(device)
    args = (q, k_blocks, v_blocks, torch.arange(n, dtype=torch.int32, device=device).unsqueeze(1),
            torch.full((n,), length, dtype=torch.int32, device=device), ranges,
            torch.arange(0, (n + 1) * length, length, dtype=torch.int32, device=device), d ** -0.5)
    got = cross_attention(*args, out=poisoned(q.shape, dtype, device))
    torch.testing.assert_close(got, reference.cross_attention(*args), **tol(dtype))


def test_cross_attention_reads_only_the_request_rows(device):
    # NaN in blocks no request owns and in the slots past each request's last row must not
    # reach the output (rows inside a request but outside a range are masked, not skipped).
    q, kc, vc, bt, sl, rg, qsl = _cross_batch(SEQ_LENS, RANGES, 4, 2, 64, 4, torch.float32, device)
    args = (q, kc, vc, bt, sl, rg, qsl, 0.125)
    before = cross_attention(*args)
    owned = torch.zeros(kc.shape[0], kc.shape[1], dtype=torch.bool)
    for i, n in enumerate(SEQ_LENS):
        for j in range(n):
            owned[bt[i, j // 4].long(), j % 4] = True
    kc[~owned.to(device)] = float("nan")
    vc[~owned.to(device)] = float("nan")
    torch.testing.assert_close(cross_attention(*args), before, atol=0, rtol=0)


def test_cross_attention_tokens_outside_every_request_get_zeros(device, poisoned):
    # As the reference: query_start_loc need not start at 0 nor end at T.
    q, kc, vc, bt, sl, rg, _ = _cross_batch([5, 7], [[[0, 2]] * 3, [[1, 5]] * 4 + [[0, 0]] * 3], 2, 1, 64, 4,
                                            torch.float32, device)
    qsl = torch.tensor([2, 4, 8], dtype=torch.int32, device=device)
    args = (q, kc, vc, bt, sl, rg, qsl, 0.125)
    got = cross_attention(*args, out=poisoned(q.shape, q.dtype, device))
    torch.testing.assert_close(got, reference.cross_attention(*args), atol=2e-5, rtol=2e-5)
    assert torch.equal(got[:2], torch.zeros_like(got[:2])) and torch.equal(got[8:], torch.zeros_like(got[8:]))


def test_cross_attention_rejects_a_range_outside_the_request_rows(device):
    q, kc, vc, bt, sl, rg, qsl = _cross_batch([5, 7], [[[0, 2]], [[1, 7]]], 2, 1, 64, 4, torch.float32, device)
    rg[1, 1] = 8  # past request 1's 7 rows
    with pytest.raises(ValueError, match="request 1 has a range outside"):
        cross_attention(q, kc, vc, bt, sl, rg, qsl, 0.125)
    with pytest.raises(ValueError, match="request 1 has a range outside"):
        reference.cross_attention(q, kc, vc, bt, sl, rg, qsl, 0.125)


def test_cross_attention_rejects_bad_shapes_and_dtypes(device):
    q, kc, vc, bt, sl, rg, qsl = _cross_batch([5, 7], [[[0, 2]], [[1, 7]]], 4, 2, 64, 4, torch.float32, device)
    with pytest.raises(ValueError, match="ranges must be int32"):
        cross_attention(q, kc, vc, bt, sl, rg[:1], qsl, 0.125)
    with pytest.raises(ValueError, match="block_tables must be"):
        cross_attention(q, kc, vc, bt[:1], sl, rg, qsl, 0.125)
    with pytest.raises(ValueError, match="query_start_loc must be"):
        cross_attention(q, kc, vc, bt, sl, rg, qsl[:2], 0.125)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        cross_attention(q[:, :3], kc, vc, bt, sl, rg, qsl, 0.125)
    with pytest.raises(TypeError, match="share a dtype"):
        cross_attention(q.half(), kc, vc, bt, sl, rg, qsl, 0.125)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        cross_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kc, vc, bt, sl, rg, qsl, 0.125)
    with pytest.raises(ValueError, match="seq_lens must lie in"):
        cross_attention(q, kc, vc, bt, sl + 2, rg, qsl, 0.125)  # 9 rows > 2 blocks of 4


@pytest.fixture
def triton_backend():
    previous = kernels.get_backend()
    kernels.set_backend("triton")
    yield
    kernels.set_backend(previous)


def test_triton_backend_dispatches_cross_attention_to_the_kernel(triton_backend, device, tol):
    launcher = importlib.import_module("vlmserve.kernels.cross_attention").cross_attention
    assert kernels._impl("cross_attention", torch.zeros(1)) is launcher
    assert callable(kernels.cross_attention) and kernels.cross_attention.__module__ == "vlmserve.kernels"
    args = (*_cross_batch([6], [[[0, 3], [0, 0]]], 2, 1, 64, 4, torch.float32, device), 0.125)
    torch.testing.assert_close(kernels.cross_attention(*args), reference.cross_attention(*args), **tol(torch.float32))


@torch.inference_mode()
def test_tiny_mllama_logits_match_transformers_through_the_triton_backend(tmp_path, triton_backend, monkeypatch):
    # Every op on the Triton backend (the interpreter here): the vision tower's padding-mask
    # attention and the decoder's cross layers both go through this kernel. One step batches
    # a prompt with two images (text before the first: empty ranges) and a text-only request
    # (cross seq_len 0); each request's logits must match transformers' within the Mllama
    # parity tolerance (1e-4 abs + 1e-5 rel, float32).
    from transformers import MllamaForConditionalGeneration as HFMllama

    from vlmserve.models.loader import load_model
    from vlmserve.models.mllama.processor import MllamaProcessor
    from vlmserve.models.mllama.tiny import make_tiny_mllama
    from tests.models.mllama.test_model_parity import ATOL, CASES, RTOL, Caches, embeds, hf_inputs, render

    ckpt = make_tiny_mllama(tmp_path / "tiny_mllama", seed=0)
    ours, _ = load_model(ckpt, dtype=torch.float32, device="cpu", progress=False)
    hf = HFMllama.from_pretrained(ckpt, dtype=torch.float32).eval()
    processor = MllamaProcessor(ckpt, json.loads((ckpt / "config.json").read_text()))
    launcher, calls = importlib.import_module("vlmserve.kernels.cross_attention").cross_attention, []
    monkeypatch.setitem(kernels._triton_ops, "cross_attention", lambda *a: calls.append(1) or launcher(*a))

    prompts = {"a": render(processor, CASES["two_images_separate"]), "b": render(processor, CASES["text_only"])}
    caches = Caches(ours)
    for req, prompt in prompts.items():
        caches.admit(req, prompt)
    vision_calls = len(calls)
    logits = caches.step([(req, 0, embeds(ours, p.prompt_token_ids)) for req, p in prompts.items()])

    assert vision_calls > 0 and len(calls) > vision_calls  # the tower and the cross layers used the kernel
    for got, prompt in zip(logits, prompts.values()):
        torch.testing.assert_close(got, hf(**hf_inputs(processor, prompt)).logits[0], atol=ATOL, rtol=RTOL)
