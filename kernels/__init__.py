"""The kernel API the models call. Each op has a PyTorch reference (`kernels/reference.py`)
and may have a Triton kernel in `kernels/<op>.py` whose launcher has the same name and
signature as the reference function.

Backend (set once at start-up from `EngineConfig.kernel_backend`):
- "auto": Triton for CUDA tensors, the reference for everything else;
- "triton": Triton always (on a CPU box this needs TRITON_INTERPRET=1 before triton's import);
- "torch": the reference always.
Switching backends touches no model code.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

if __name__ == "kernels":
    # This folder was found as a top-level `kernels` because a checkout's root is on sys.path
    # (`python -m pytest` or `python -m vlmserve` run from it). That name belongs to the Hub's
    # `kernels` distribution, which transformers imports: hand the import over to it. What
    # follows then only fills this stray module object, which nothing keeps.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _saved_path = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules["kernels"]
    try:
        sys.modules["kernels"] = importlib.import_module("kernels")
    finally:
        sys.path[:] = _saved_path

import torch

from vlmserve.kernels import reference

BACKENDS = ("auto", "triton", "torch")
_backend = "auto"
_triton_ops: dict[str, Callable | None] = {}


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


def _triton_op(name: str) -> Callable | None:
    if name not in _triton_ops:
        try:
            module = importlib.import_module(f"vlmserve.kernels.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"vlmserve.kernels.{name}":
                raise
            module = None
        _triton_ops[name] = getattr(module, name, None) if module else None
    return _triton_ops[name]


def _impl(name: str, x: torch.Tensor) -> Callable:
    if _backend == "torch" or (_backend == "auto" and not x.is_cuda):
        return getattr(reference, name)
    op = _triton_op(name)
    if op is None:
        if _backend == "triton":
            raise NotImplementedError(f"no Triton kernel for {name!r}; use --kernel-backend torch or auto")
        return getattr(reference, name)
    return op


def rms_norm(x, weight, eps, residual=None):
    return _impl("rms_norm", x)(x, weight, eps, residual)


def silu_and_mul(x):
    return _impl("silu_and_mul", x)(x)


def rotary(q, k, cos, sin):
    return _impl("rotary", q)(q, k, cos, sin)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    return _impl("varlen_attention", q)(q, k, v, cu_seqlens, max_seqlen, causal, scale)


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    return _impl("write_kv", k)(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale, plan=None
):
    """`plan`: from `plan_paged_attention` over the same batch (None where that returned None)."""
    op = _impl("paged_attention", q)
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len, scale)
    return op(*args, plan) if plan is not None else op(*args)


def plan_paged_attention(block_tables, seq_lens, query_start_loc, block_size, query_start_loc_cpu, seq_lens_cpu):
    """The step-wide part of `paged_attention` (gather indices, masks), built once and passed
    to every layer's call; None when the backend for these tensors needs none (Triton)."""
    if _impl("paged_attention", block_tables) is not reference.paged_attention:
        return None
    return reference.plan_paged_attention(
        block_tables, seq_lens, query_start_loc, block_size, query_start_loc_cpu, seq_lens_cpu
    )


def cross_attention(q, k_cache, v_cache, block_tables, seq_lens, ranges, query_start_loc, scale):
    return _impl("cross_attention", q)(q, k_cache, v_cache, block_tables, seq_lens, ranges, query_start_loc, scale)


def merge_embeddings(inputs_embeds, mm_embeds, positions):
    return _impl("merge_embeddings", inputs_embeds)(inputs_embeds, mm_embeds, positions)


def normalize_patchify(
    pixels, lut, patch_size, merge_size=1, temporal_patch_size=1, layout="qwen2_vl", out_dtype=torch.float32
):
    return _impl("normalize_patchify", pixels)(
        pixels, lut, patch_size, merge_size, temporal_patch_size, layout, out_dtype
    )


def resize_patchify(
    pixels, levels, y_starts, y_weights, x_starts, x_weights, mean, std, origins, place, crop_size, patch_size
):
    return _impl("resize_patchify", pixels)(
        pixels, levels, y_starts, y_weights, x_starts, x_weights, mean, std, origins, place, crop_size, patch_size
    )

class _KernelPackage(type(importlib)):
    """Importing the Triton module `kernels.<op>` (by `_triton_op` or any `from kernels.<op>
    import ...`) makes Python bind the package attribute `<op>` to that submodule, replacing
    the dispatcher above; the next `kernels.<op>(...)` would then call a module. Keep the
    dispatcher: the submodule stays reachable through sys.modules and `from` imports."""

    def __setattr__(self, name, value):
        current = self.__dict__.get(name)
        if (
            isinstance(value, type(importlib))
            and value.__name__ == f"{self.__name__}.{name}"
            and callable(current)
            and not isinstance(current, type(importlib))
        ):
            return
        super().__setattr__(name, value)


if __name__ == "vlmserve.kernels":
    sys.modules[__name__].__class__ = _KernelPackage
