"""The tensor-parallel layers against their unsplit counterparts. Ranks run as threads of
this process, each with its own gloo group on one store (the same backend the engine's
worker processes use); every module is loaded from full checkpoint tensors through
`WeightLoadTracker`, so the load-time slicing is under test too."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmserve.models.layers.decoder import DecoderLayer
from vlmserve.models.layers.parallel import (
    SINGLE, ColumnParallelLinear, ParallelLMHead, RowParallelLinear, TPGroup, VocabParallelEmbedding, even_split,
    parallel_logits,
)
from vlmserve.models.layers.weights import WeightLoadTracker
from vlmserve.runner.forward_batch import ForwardBatch
from vlmserve.runner.tensor_parallel import _free_port, connect


def run_ranks(size: int, fn):
    """fn(tp) on `size` ranks at once; returns their results by rank (re-raises a failure)."""
    port, results, errors = _free_port(), [None] * size, []

    def rank_main(rank: int) -> None:
        comm = None
        try:
            comm = connect(rank, size, port, torch.device("cpu"))
            results[rank] = fn(TPGroup(rank, size, comm))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            if comm is not None:
                comm.close()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def load(module: nn.Module, tensors: dict[str, torch.Tensor], fused: dict[str, list[tuple[str, int]]] = {}):
    """tensors: checkpoint name → full tensor, named `param` or `param:shard`."""
    tracker = WeightLoadTracker(module)
    for name, shards in fused.items():
        tracker.declare_fused(name, shards)
    with torch.no_grad():
        for key, tensor in tensors.items():
            name, _, shard = key.partition(":")
            tracker.copy(name, tensor, key, shard)
    tracker.check_complete()
    return module


@pytest.mark.parametrize("size", [2, 4])
def test_column_then_row_parallel_equals_the_full_linears(size):
    g = torch.Generator().manual_seed(0)
    w1, b1, w2, b2 = (torch.randn(48, 16, generator=g), torch.randn(48, generator=g),
                      torch.randn(16, 48, generator=g), torch.randn(16, generator=g))
    x = torch.randn(5, 16, generator=g)
    expected = F.linear(F.linear(x, w1, b1).relu(), w2, b2)

    def rank(tp):
        col = load(ColumnParallelLinear(16, [("", 48, even_split(tp))], True, torch.float32, "cpu"),
                   {"weight": w1, "bias": b1})
        row = load(RowParallelLinear(48, 16, True, tp, torch.float32, "cpu"), {"weight": w2, "bias": b2})
        assert col.weight.shape == (48 // size, 16) and row.weight.shape == (16, 48 // size)
        return row(col(x).relu())

    outs = run_ranks(size, rank)
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(out, outs[0])  # every rank holds the same sum


def test_vocab_parallel_embedding_and_head_equal_the_full_ones_with_an_uneven_vocab():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(7, 8, generator=g)  # 7 rows over 2 ranks: 4 + 3
    ids = torch.tensor([0, 6, 3, 4, 2, 6, 1])
    hidden = torch.randn(3, 8, generator=g)

    def rank(tp):
        emb = load(VocabParallelEmbedding(7, 8, tp, torch.float32, "cpu"), {"weight": table})
        head = load(ParallelLMHead(8, 7, tp, torch.float32, "cpu"), {"weight": table})
        assert emb.weight.shape[0] == (4, 3)[tp.rank]
        return emb(ids), parallel_logits(hidden, head.weight, 7, tp), parallel_logits(hidden, emb.weight, 7, tp)

    for embedded, logits, tied in run_ranks(2, rank):
        assert torch.equal(embedded, F.embedding(ids, table))  # one non-zero row per token: exact
        torch.testing.assert_close(logits, F.linear(hidden, table), rtol=1e-6, atol=1e-6)
        assert torch.equal(tied, logits)


def _checkpoint_of(layer: DecoderLayer, heads: int, kv_heads: int, head_dim: int, inter: int):
    """The unsplit layer's weights as a checkpoint would hold them (separate q/k/v, gate/up)."""
    sd = layer.state_dict()
    q, k, v = sd["self_attn.qkv_proj.weight"].split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    gate, up = sd["mlp.gate_up_proj.weight"].split([inter, inter])
    tensors = {"self_attn.qkv_proj.weight:q_proj": q, "self_attn.qkv_proj.weight:k_proj": k,
               "self_attn.qkv_proj.weight:v_proj": v, "mlp.gate_up_proj.weight:gate_proj": gate,
               "mlp.gate_up_proj.weight:up_proj": up}
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight"):
        tensors[name] = sd[name]
    fused = {"self_attn.qkv_proj.weight": [("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                                           ("v_proj", kv_heads * head_dim)],
             "mlp.gate_up_proj.weight": [("gate_proj", inter), ("up_proj", inter)]}
    return tensors, fused, k


def _prefill(layer: DecoderLayer, x: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    n = x.shape[0]
    caches = [(torch.zeros(2, 8, kv_heads, head_dim), torch.zeros(2, 8, kv_heads, head_dim))]
    batch = ForwardBatch(
        num_reqs=1, num_tokens=n, query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32), block_tables=torch.tensor([[1, 0]], dtype=torch.int32),
        slot_mapping=torch.arange(8, 8 + n), max_query_len=n, max_seq_len=n, kv_caches=caches,
        query_start_loc_cpu=[0, n], seq_lens_cpu=[n],
    )
    pos = torch.arange(n, dtype=torch.float32)[:, None] * (10000 ** (-torch.arange(head_dim // 2) / (head_dim // 2)))
    out, residual = layer(x, None, pos.cos(), pos.sin(), batch)
    return out + residual


# (KV heads, ranks): fewer KV heads than ranks replicates each on size / kv_heads ranks.
@pytest.mark.parametrize("kv_heads,size", [(1, 2), (2, 2), (2, 4)])
def test_decoder_layer_split_over_ranks_equals_the_full_layer(kv_heads, size):
    heads, head_dim, hidden, inter = 4, 8, 32, 64
    torch.manual_seed(2)
    full = DecoderLayer(hidden, inter, heads, kv_heads, head_dim, 1e-6, 0, False, torch.float32, "cpu")
    with torch.no_grad():
        for p in full.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    tensors, fused, k_full = _checkpoint_of(full, heads, kv_heads, head_dim, inter)
    x = torch.randn(6, hidden)
    with torch.inference_mode():
        expected = _prefill(full, x, kv_heads, head_dim)

    def rank(tp):
        layer = DecoderLayer(hidden, inter, heads, kv_heads, head_dim, 1e-6, 0, False, torch.float32, "cpu", tp=tp)
        load(layer, tensors, fused)
        attn = layer.self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (heads // size, max(1, kv_heads // size))
        k_here = attn.qkv_proj.weight[attn.q_size : attn.q_size + attn.kv_size]
        first = tp.rank * kv_heads // size  # this rank's first KV head
        assert torch.equal(k_here, k_full[first * head_dim : first * head_dim + attn.kv_size])
        with torch.inference_mode():
            return _prefill(layer, x, attn.num_kv_heads, head_dim)

    for out in run_ranks(size, rank):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_size_that_does_not_divide_the_heads_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 3 does not divide the number of attention heads \(4\)"):
        DecoderLayer(32, 64, 4, 2, 8, 1e-6, 0, False, torch.float32, "meta", tp=TPGroup(0, 3))
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 4 does not divide the number of KV heads \(6\)"):
        DecoderLayer(48, 64, 12, 6, 4, 1e-6, 0, False, torch.float32, "meta", tp=TPGroup(0, 4))
    assert SINGLE.size == 1
