"""KV cache sizing from device memory (`--gpu-memory-utilization`).

After the weights are loaded, one profiling step runs the largest batch the config allows
(`max_num_batched_tokens` prompt tokens over `max_num_seqs` requests, every one of them
sampled, so the LM head and the sampler run at their widest) over a throwaway KV cache just
big enough for it. What that step allocated beyond the weights is the activation peak; the KV
cache gets what is left of `utilization × total` after the memory in use (weights, the CUDA
context, other processes) and that peak:

    kv_budget = utilization × total − (total − free) − activation_peak

Mllama's cross-attention pool takes `cross_fraction` of the budget. The arithmetic is plain
integers over a `DeviceMemory` (CUDA's, or a fake one in tests); only `CudaMemory` and
`profile_activation_peak` touch torch.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from typing import Callable, Protocol

logger = logging.getLogger(__name__)
GiB = 2**30


class DeviceMemory(Protocol):
    def mem_get_info(self) -> tuple[int, int]: ...  # (free, total) bytes of the device
    def reset_peak(self) -> None: ...
    def peak_allocated(self) -> int: ...  # bytes allocated at the peak since reset_peak
    def allocated(self) -> int: ...
    def release_cached(self) -> None: ...  # hand the allocator's unused pool back to the device


class CudaMemory:
    def __init__(self, device) -> None:
        import torch

        self._cuda, self._device = torch.cuda, device

    def mem_get_info(self) -> tuple[int, int]:
        return self._cuda.mem_get_info(self._device)

    def reset_peak(self) -> None:
        self._cuda.synchronize(self._device)
        self._cuda.reset_peak_memory_stats(self._device)

    def peak_allocated(self) -> int:
        self._cuda.synchronize(self._device)
        return self._cuda.max_memory_allocated(self._device)

    def allocated(self) -> int:
        return self._cuda.memory_allocated(self._device)

    def release_cached(self) -> None:
        self._cuda.empty_cache()


@dataclass(frozen=True)
class MemoryPlan:
    total: int
    utilization: float
    in_use: int  # weights, CUDA context, other processes: total − free after profiling
    activation_peak: int
    kv_budget: int
    num_blocks: int
    num_cross_blocks: int

    def describe(self) -> str:
        return (f"device memory {self.total / GiB:.2f} GiB x {self.utilization:.2f} = "
                f"{self.total * self.utilization / GiB:.2f} GiB: in use {self.in_use / GiB:.2f} GiB (weights, "
                f"context, other processes), activation peak {self.activation_peak / GiB:.2f} GiB, KV cache "
                f"{self.kv_budget / GiB:.2f} GiB = {self.num_blocks} blocks"
                + (f" + {self.num_cross_blocks} cross blocks" if self.num_cross_blocks else ""))


def plan_kv_cache(
    mem: DeviceMemory,
    utilization: float,
    activation_peak: int,
    block_bytes: int,
    cross_block_bytes: int = 0,
    cross_fraction: float = 0.2,
) -> MemoryPlan:
    """Blocks that fit the budget (see the module docstring). `cross_block_bytes` 0: no cross pool."""
    free, total = mem.mem_get_info()
    in_use = total - free
    budget = int(total * utilization) - in_use - activation_peak
    cross_budget = int(budget * cross_fraction) if cross_block_bytes else 0
    num_blocks = (budget - cross_budget) // block_bytes if budget > 0 else 0
    num_cross = cross_budget // cross_block_bytes if cross_block_bytes else 0
    plan = MemoryPlan(total, utilization, in_use, activation_peak, budget, num_blocks, num_cross)
    if num_blocks < 2 or (cross_block_bytes and num_cross < 2):
        raise ValueError(
            f"no room for the KV cache: {plan.describe()}; raise --gpu-memory-utilization (now {utilization}), "
            "lower --max-num-batched-tokens or --max-num-seqs (they set the activation peak), or use a smaller "
            "--dtype or more GPUs"
        )
    return plan


def profile_blocks(max_num_batched_tokens: int, max_num_seqs: int, block_size: int) -> int:
    """KV blocks the profiling batch needs: every request's prompt rounded up to whole blocks."""
    seqs = min(max_num_seqs, max_num_batched_tokens)
    return math.ceil(max_num_batched_tokens / block_size) + seqs + 1


def profile_activation_peak(mem: DeviceMemory, run_profile_step: Callable[[], int]) -> int:
    """Bytes the step allocated beyond what was allocated before it (the weights), less the
    throwaway KV cache it made (`run_profile_step` returns that cache's bytes)."""
    gc.collect()
    mem.release_cached()
    mem.reset_peak()
    before = mem.allocated()
    own_kv_bytes = run_profile_step()
    peak = mem.peak_allocated() - before - own_kv_bytes
    gc.collect()
    mem.release_cached()  # the step's activations and its throwaway KV cache go back
    logger.info("profiling step: activation peak %.3f GiB", peak / GiB)
    return max(peak, 0)
