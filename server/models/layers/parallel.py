"""Tensor-parallel primitives: a TP group passed explicitly (never a global), linears split
by output rows (column-parallel) or input columns (row-parallel, all-reduced), the
vocabulary-split embedding and LM head, and the rules that slice full checkpoint tensors.

World size 1 (`SINGLE`) is the plain model: every module here degenerates to its nn
counterpart with no collective and no extra copy.

Sharding happens at load time: a module declares, per parameter, the dim it is split along
and, per fused shard label ("q_proj", "k_proj", ... or "" when unfused), a `Split`: the
function from the shard's full length along that dim to (start, length) of this rank's part.
`WeightLoadTracker` narrows each checkpoint tensor with it before the copy, so a rank only
ever stores its slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

Device = torch.device | str
# full length along the split dim -> (start, length) of this rank's part
Split = Callable[[int], tuple[int, int]]


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group. `group` (None when size == 1) holds
    the group's torch.distributed backend as `.pg` (a ProcessGroupGloo / ProcessGroupNCCL built
    on its own store, not the default group: several engines may live in one process); see
    `runner/tensor_parallel.py`."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (every rank gets the same tensor)."""
        if self.size > 1:
            self.group.pg.allreduce([x]).wait()
        return x

    def all_gather_last(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's x [..., sizes[rank]] along the last dim. Ranks' parts may
        differ in size (a vocabulary that does not divide): each is padded to the largest."""
        if self.size == 1:
            return x
        width = max(sizes)
        padded = F.pad(x, (0, width - x.shape[-1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        self.group.pg.allgather([parts], [padded]).wait()
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)


SINGLE = TPGroup()


def divide(total: int, tp: TPGroup, what: str) -> int:
    if total % tp.size:
        raise ValueError(
            f"--tensor-parallel-size {tp.size} does not divide {what} ({total}); choose a size that divides it"
        )
    return total // tp.size


def even_split(tp: TPGroup) -> Split:
    """Rank r takes the r-th of `size` equal parts."""

    def split(full: int) -> tuple[int, int]:
        part = full // tp.size
        if part * tp.size != full:
            raise ValueError(f"a tensor dim of {full} does not split into {tp.size} equal parts")
        return tp.rank * part, part

    return split


def kv_head_split(tp: TPGroup, num_kv_heads: int, head_dim: int) -> Split:
    """K/V rows [num_kv_heads * head_dim]: split by heads when size divides them; when there
    are fewer heads than ranks, each head is replicated on size / num_kv_heads consecutive
    ranks (rank r holds head r * num_kv_heads // size)."""
    if num_kv_heads >= tp.size:
        divide(num_kv_heads, tp, "the number of KV heads")
        return even_split(tp)
    if tp.size % num_kv_heads:
        raise ValueError(
            f"--tensor-parallel-size {tp.size} is neither a divisor nor a multiple of the number of KV heads "
            f"({num_kv_heads}); choose one that is"
        )

    def split(full: int) -> tuple[int, int]:
        if full != num_kv_heads * head_dim:
            raise ValueError(f"K/V tensor of {full} rows, expected {num_kv_heads} heads of {head_dim}")
        return (tp.rank * num_kv_heads // tp.size) * head_dim, head_dim

    return split


def local_kv_heads(num_kv_heads: int, tp: TPGroup) -> int:
    return max(1, num_kv_heads // tp.size)


def vocab_split(vocab: int, tp: TPGroup) -> tuple[int, int]:
    """(start, length) of this rank's vocabulary rows: ceil(vocab / size) per rank, the last
    rank's part shorter when size does not divide vocab."""
    per = -(-vocab // tp.size)
    start = min(tp.rank * per, vocab)
    return start, min(per, vocab - start)


def vocab_sizes(vocab: int, tp: TPGroup) -> list[int]:
    return [vocab_split(vocab, TPGroup(r, tp.size))[1] for r in range(tp.size)]


class ColumnParallelLinear(nn.Module):
    """y[:, local rows] = x @ W_local.T (+ b_local). The output rows are the concatenation of
    `parts` [(label, full rows, Split)], each split on its own (fused q/k/v: by q heads and
    by KV heads; fused gate/up: each half evenly). No collective: the next row-parallel
    linear consumes the local part."""

    def __init__(
        self, in_features: int, parts: list[tuple[str, int, Split]], bias: bool, dtype: torch.dtype, device: Device,
    ) -> None:
        super().__init__()
        rows = [split(full)[1] for _, full, split in parts]
        self.out_features = sum(rows)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device)) if bias else None
        splits = {label: split for label, _, split in parts}
        self.tp_splits: dict[str, tuple[int, dict[str, Split]]] = {"weight": (0, splits)}
        if bias:
            self.tp_splits["bias"] = (0, splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local @ W[:, local cols].T) + b: the input is the previous
    column-parallel linear's local part; the bias (replicated) is added once, after the sum."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, tp: TPGroup, dtype: torch.dtype, device: Device,
        split: Split | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        split = split or even_split(tp)
        local_in = split(in_features)[1]
        self.weight = nn.Parameter(torch.empty(out_features, local_in, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.tp_splits = {"weight": (1, {"": split})}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + length) of the table on each rank (see `vocab_split`); a token
    outside the local range embeds to zeros, so the all-reduce adds exactly one non-zero
    row: the result equals the full table's lookup bit for bit.

    `parts` [(label, rows)]: a table the checkpoint stores in pieces (Molmo's embedding |
    new_embedding); each piece contributes its rows that fall in this rank's range."""

    def __init__(
        self, num_embeddings: int, dim: int, tp: TPGroup, dtype: torch.dtype, device: Device,
        parts: list[tuple[str, int]] | None = None,
    ) -> None:
        super().__init__()
        self.tp, self.num_embeddings = tp, num_embeddings
        self.start, length = vocab_split(num_embeddings, tp)
        self.weight = nn.Parameter(torch.empty(length, dim, dtype=dtype, device=device))
        if parts is None:
            self.tp_splits = {"weight": (0, {"": lambda full: vocab_split(full, tp)})}
            return
        if sum(rows for _, rows in parts) != num_embeddings:
            raise ValueError(f"embedding parts {parts} do not add up to {num_embeddings} rows")
        splits, first = {}, 0
        for label, rows in parts:
            splits[label] = _range_split(first, rows, self.start, length)
            first += rows
        self.tp_splits = {"weight": (0, splits)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(out)


def _range_split(first: int, rows: int, start: int, length: int) -> Split:
    """The rows of a piece at [first, first + rows) of a table that lie in [start, start +
    length), as (start, length) within the piece (length 0 when none do)."""

    def split(full: int) -> tuple[int, int]:
        if full != rows:
            raise ValueError(f"an embedding piece of {full} rows, expected {rows}")
        lo, hi = max(first, start), min(first + rows, start + length)
        return (lo - first, hi - lo) if hi > lo else (0, 0)

    return split


def parallel_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab: int, tp: TPGroup) -> torch.Tensor:
    """hidden [B, H] @ this rank's vocabulary rows of the LM head (or the tied embedding) →
    float32 logits [B, vocab] on every rank (all-gathered: each column is computed by one
    rank in full, so the logits equal the unsplit head's)."""
    local = F.linear(hidden, weight).float()
    return tp.all_gather_last(local, vocab_sizes(vocab, tp))


class ParallelLMHead(nn.Module):
    """The output projection split by vocabulary rows, like `VocabParallelEmbedding`."""

    def __init__(self, hidden: int, vocab: int, tp: TPGroup, dtype: torch.dtype, device: Device) -> None:
        super().__init__()
        self.tp, self.vocab = tp, vocab
        self.weight = nn.Parameter(torch.empty(vocab_split(vocab, tp)[1], hidden, dtype=dtype, device=device))
        self.tp_splits = {"weight": (0, {"": lambda full: vocab_split(full, tp)})}


def tp_splits_of(module: nn.Module) -> dict[str, tuple[int, dict[str, Split]]]:
    """Parameter name (as in `module.named_parameters()`) → (dim, {shard label: Split}) for
    every tensor-parallel parameter under `module`."""
    out = {}
    for prefix, sub in module.named_modules():
        for pname, rule in getattr(sub, "tp_splits", {}).items():
            out[f"{prefix}.{pname}" if prefix else pname] = rule
    return out
