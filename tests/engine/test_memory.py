"""KV cache sizing from device memory: the arithmetic over a fake device, and the profiling
step at the largest batch the config allows."""

from __future__ import annotations

import pytest
import torch

from vlmserve.config import EngineConfig
from vlmserve.engine import builder, memory
from vlmserve.models.loader import load_model
from vlmserve.runner.model_runner import ModelRunner, kv_block_bytes

GiB = 2**30


class FakeMemory:
    def __init__(self, free: int, total: int, allocated: int = 0, peak: int = 0) -> None:
        self.free, self.total, self._allocated, self._peak = free, total, allocated, peak
        self.calls: list[str] = []

    def mem_get_info(self):
        return self.free, self.total

    def reset_peak(self):
        self.calls.append("reset")

    def peak_allocated(self):
        return self._peak

    def allocated(self):
        return self._allocated

    def release_cached(self):
        self.calls.append("release")


def test_budget_is_utilization_of_total_less_memory_in_use_and_the_activation_peak() -> None:
    mem = FakeMemory(free=30 * GiB, total=80 * GiB)  # 50 GiB in use: weights, context, others
    plan = memory.plan_kv_cache(mem, 0.9, activation_peak=2 * GiB, block_bytes=2**20)
    assert plan.kv_budget == int(80 * GiB * 0.9) - 50 * GiB - 2 * GiB
    assert plan.num_blocks == plan.kv_budget // 2**20 and plan.num_cross_blocks == 0
    assert "activation peak 2.00 GiB" in plan.describe()


def test_cross_pool_takes_its_fraction_of_the_budget() -> None:
    with pytest.raises(ValueError, match="KV cache 0.00 GiB"):  # 40 GiB allowed, 40 in use
        memory.plan_kv_cache(FakeMemory(40 * GiB, 80 * GiB), 0.5, 0, 2**20, 2**19)
    plan = memory.plan_kv_cache(FakeMemory(60 * GiB, 80 * GiB), 1.0, 0, 2**20, 2**19, cross_fraction=0.25)
    assert plan.num_cross_blocks == (60 * GiB // 4) // 2**19
    assert plan.num_blocks == (60 * GiB - 60 * GiB // 4) // 2**20


def test_no_room_names_the_flags_that_make_room() -> None:
    mem = FakeMemory(free=4 * GiB, total=80 * GiB)
    with pytest.raises(ValueError, match="--gpu-memory-utilization.*--max-num-batched-tokens"):
        memory.plan_kv_cache(mem, 0.9, activation_peak=GiB, block_bytes=2**20)


def test_activation_peak_excludes_the_weights_and_the_throwaway_cache() -> None:
    mem = FakeMemory(free=0, total=0, allocated=10 * GiB, peak=13 * GiB)
    assert memory.profile_activation_peak(mem, lambda: GiB) == 2 * GiB
    assert mem.calls == ["release", "reset", "release"]


def test_profiling_step_runs_the_largest_batch_in_one_forward_pass(tiny_ckpt, monkeypatch) -> None:
    config = EngineConfig(model=str(tiny_ckpt), max_num_batched_tokens=200, max_num_seqs=7, block_size=16)
    model, _ = load_model(tiny_ckpt, dtype=torch.float32, device="cpu", progress=False)
    seen = []
    real_execute = ModelRunner.execute

    def spy(self, out):
        seen.append((out.total_num_scheduled_tokens, len(out.num_scheduled_tokens)))
        result = real_execute(self, out)
        seen.append(sum(len(t) for t in result.sampled_token_ids.values()))
        return result

    monkeypatch.setattr(ModelRunner, "execute", spy)
    kv_bytes = builder._profile_step(model, config, torch.float32, torch.device("cpu"), max_model_len=4096)
    assert seen == [(200, 7), 7]  # every token in one pass, every row sampled
    blocks = memory.profile_blocks(200, 7, 16)
    assert blocks * 16 >= 200 + 7 * 15  # room for each prompt's partial last block
    assert kv_bytes == blocks * kv_block_bytes(model, 16, torch.float32)
