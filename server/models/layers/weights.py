"""Bookkeeping for `load_weights`: which parameters (and which shards of fused ones) a
checkpoint filled, so a load fails naming every missing or unexpected tensor. Under tensor
parallelism each checkpoint tensor is first narrowed to this rank's slice (`layers/parallel.py`);
families declare fused shards by their full row counts either way."""

from __future__ import annotations

import torch
from torch import nn

from vlmserve.models.layers.parallel import tp_splits_of

# Checkpoint tensors that carry no weights: recomputed buffers some exporters saved.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


class WeightLoadTracker:
    """Copies checkpoint tensors into a module's parameters.

    A fused parameter (q/k/v in one matrix, gate/up in one) is declared with its shards'
    labels and row counts, in row order; each shard is filled by one checkpoint tensor."""

    def __init__(self, module: nn.Module) -> None:
        self.params: dict[str, nn.Parameter] = dict(module.named_parameters())
        # param name -> [(label, first row, rows)]; unfused params have one shard of all rows.
        self.shards: dict[str, list[tuple[str, int, int]]] = {
            name: [("", 0, p.shape[0] if p.dim() else 1)] for name, p in self.params.items()
        }
        self.filled: set[tuple[str, str]] = set()
        self.unexpected: list[str] = []
        self.tp_splits = tp_splits_of(module)

    def declare_fused(self, param_name: str, shards: list[tuple[str, int]]) -> None:
        """`shards`: (label, rows in the checkpoint), in row order; a tensor-parallel
        parameter holds only this rank's rows of each."""
        if param_name in self.tp_splits:
            dim, splits = self.tp_splits[param_name]
            assert dim == 0, f"{param_name}: fused shards are rows"
            shards = [(label, splits[label](rows)[1]) for label, rows in shards]
        total = sum(rows for _, rows in shards)
        rows_here = self.params[param_name].shape[0]
        if total != rows_here:
            raise ValueError(f"{param_name}: shards {shards} cover {total} rows, the parameter has {rows_here}")
        start, layout = 0, []
        for label, rows in shards:
            layout.append((label, start, rows))
            start += rows
        self.shards[param_name] = layout

    def drop(self, param_name: str) -> None:
        """Forget a parameter the model no longer has (e.g. an lm_head replaced by tying)."""
        self.params.pop(param_name, None)
        self.shards.pop(param_name, None)

    def copy(self, param_name: str, tensor: torch.Tensor, source: str, shard: str = "") -> None:
        """Copy `tensor` (checkpoint name `source`) into `param_name`'s shard `shard`."""
        if param_name not in self.params:
            self.unexpected.append(source)
            return
        layout = {label: (start, rows) for label, start, rows in self.shards[param_name]}
        if shard not in layout:
            raise ValueError(f"{source}: {param_name} has no shard {shard!r} (shards: {sorted(layout)})")
        if param_name in self.tp_splits:
            dim, splits = self.tp_splits[param_name]
            split = splits.get(shard) or splits.get("")
            if split is None:
                raise ValueError(f"{source}: {param_name} has no tensor-parallel split for shard {shard!r}")
            first, length = split(tensor.shape[dim])
            tensor = tensor.narrow(dim, first, length)
        param = self.params[param_name]
        start, rows = layout[shard]
        target = param.data if shard == "" else param.data[start : start + rows]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint tensor {source} has shape {tuple(tensor.shape)}, but the model expects "
                f"{tuple(target.shape)} for {param_name}{f' ({shard})' if shard else ''}: does config.json "
                "match the weights?"
            )
        if (param_name, shard) in self.filled:
            raise ValueError(f"checkpoint tensor {source} fills {param_name} {shard!r}, which was already loaded")
        target.copy_(tensor)
        self.filled.add((param_name, shard))

    def missing(self) -> list[str]:
        out = []
        for name, layout in self.shards.items():
            for label, _, _ in layout:
                if (name, label) not in self.filled:
                    out.append(f"{name} ({label})" if label else name)
        return out

    def check_complete(self) -> None:
        problems = []
        if self.missing():
            problems.append(f"missing weights ({len(self.missing())}): {', '.join(self.missing()[:20])}")
        if self.unexpected:
            problems.append(f"unexpected weights ({len(self.unexpected)}): {', '.join(self.unexpected[:20])}")
        if problems:
            raise ValueError(
                "the checkpoint does not match the model: " + "; ".join(problems)
                + ". Check that config.json belongs to these weights and that the download is complete."
            )
