"""Tensor parallelism end to end: an engine over 2 gloo ranks (rank 0 here, one worker
process) returns exactly the greedy tokens of the single-rank engine, for every family, over
one batch mixing text-only and image requests, with chunked prefill and decode."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.models.registry import make_tiny_model
from vlmserve.runner.tensor_parallel import TPRunner
from tests.utils import image, make_llm, user, wait_process_exited

FAMILIES = {
    "qwen2_vl": ("qwen2_vl", {}),
    "pixtral": ("pixtral", {"format": "hf"}),
    "mllama": ("mllama", {}),
    "molmo": ("molmo", {}),
    "nvlm_d": ("nvlm_d", {}),
}


def _workload(llm):
    chats = [
        ([user("What is the capital of France? Answer briefly.")], []),
        ([user(image(64, 48, 1), "Describe this picture")], [image(64, 48, 1)]),
        ([user("first", image(40, 72, 2)), {"role": "assistant", "content": "ok"}, user("and more?")],
         [image(40, 72, 2)]),
        ([user("Count: one two three four five six seven")], []),
    ]
    prompts = [llm.render_chat(c, imgs) for c, imgs in chats]
    params = [SamplingParams(temperature=0.0, max_tokens=6 + i, ignore_eos=True) for i in range(len(prompts))]
    return prompts, params


@pytest.mark.parametrize("family_id", list(FAMILIES))
def test_two_gloo_ranks_return_the_tokens_of_one(family_id, tmp_path):
    family, kwargs = FAMILIES[family_id]
    ckpt = make_tiny_model(family, tmp_path / family_id, seed=0, **kwargs)
    # A small token budget: prompts are prefilled in several chunks, mixed with decodes.
    common = dict(num_cross_kv_blocks=1024, max_num_batched_tokens=48, device="cpu")
    single = make_llm(ckpt, **common)
    prompts, params = _workload(single)
    expected = [c.token_ids for c in single.generate(prompts, params)]
    assert len({tuple(t) for t in expected}) > 1, "a degenerate model proves nothing"

    parallel = make_llm(ckpt, tensor_parallel_size=2, **common)
    try:
        assert isinstance(parallel.runner, TPRunner)
        spec, full = parallel.runner.model.kv_cache_spec, single.runner.model.kv_cache_spec
        assert spec.num_kv_heads * 2 == full.num_kv_heads  # each rank holds half the KV heads
        got = [c.token_ids for c in parallel.generate(prompts, params)]
    finally:
        parallel.runner.workers.close()
    assert got == expected


@pytest.mark.parametrize("family_id", list(FAMILIES))
def test_a_size_that_does_not_divide_the_heads_is_refused_at_load(family_id, tmp_path):
    from vlmserve.models.layers.parallel import TPGroup
    from vlmserve.models.loader import load_model

    family, kwargs = FAMILIES[family_id]
    ckpt = make_tiny_model(family, tmp_path / family_id, seed=0, **kwargs)
    # Every tiny decoder has 4 attention heads; the refusal comes before any collective.
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 3 does not divide the number of attention heads"):
        load_model(ckpt, device="cpu", progress=False, tp=TPGroup(0, 3))


def _tp_workers_of(pid: int) -> list[int]:
    """Pids of the tensor-parallel worker processes whose parent is `pid`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        if ppid == pid and b"vlmserve.runner.tensor_parallel" in cmdline:
            found.append(int(proc.name))
    return found


async def test_the_engine_process_drives_its_worker_and_takes_it_down_at_shutdown(tiny_ckpt):
    """What `vlmserve serve --tensor-parallel-size 2` runs: the engine-core process is rank 0
    and starts the worker itself; the server's tokens equal the single-rank engine's."""
    from vlmserve.config import EngineConfig
    from vlmserve.engine.async_engine import AsyncEngine
    from vlmserve.engine.core_client import build_core_client

    async def tokens(**overrides) -> tuple[list[list[int]], list[int]]:
        config = EngineConfig(model=str(tiny_ckpt), num_kv_blocks=128, max_model_len=1024, kernel_backend="torch",
                              device="cpu", **overrides)
        core, frontend = await asyncio.to_thread(build_core_client, config)
        engine = AsyncEngine(core, frontend.processor, model_name="tiny")
        await engine.start()
        workers = _tp_workers_of(core.pid) if hasattr(core, "pid") else []
        try:
            out = []
            for i, text in enumerate(["Describe it.", "What colour?"]):
                img = image(80 + 16 * i, 64, seed=7 + i)
                prompt = await engine.render_chat([user(img, text)], [img])
                got = []
                async for chunk in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8), f"r{i}"):
                    got += chunk.token_ids
                out.append(got)
        finally:
            await engine.shutdown()
        return out, workers

    expected, _ = await tokens(engine_mode="thread")
    got, workers = await tokens(engine_mode="process", tensor_parallel_size=2)
    assert got == expected
    assert len(workers) == 1
    assert wait_process_exited(workers[0], timeout=30), "the worker outlived its engine"


def test_a_request_that_fails_every_rank_ends_in_error_and_the_ranks_stay_in_step(tiny_ckpt):
    """An image the tower refuses raises on every rank at the same point; rank 0's culprit
    search then re-runs halves of the step, each mirrored on the worker, and the other
    request still gets the single-rank tokens."""
    import dataclasses

    common = dict(device="cpu", num_kv_blocks=128)
    single = make_llm(tiny_ckpt, **common)
    img = image(64, 56, seed=11)
    good = single.render_chat([user(img, "What is this?")], [img])
    text = single.render_chat([user("Plain text here, please.")], [])
    bad_img = image(72, 56, seed=12)
    bad = single.render_chat([user(bad_img, "And this?")], [bad_img])
    item = bad.mm_items[0]
    bad = dataclasses.replace(bad, mm_items=[dataclasses.replace(item, data={**item.data, "grid_thw": (1, 2, 2)})])
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = [c.token_ids for c in single.generate([good, text], params)]

    parallel = make_llm(tiny_ckpt, tensor_parallel_size=2, **common)
    try:
        out = parallel.generate([good, bad, text], params)
        assert out[1].finish_reason == "error"
        assert [out[0].token_ids, out[2].token_ids] == expected
        assert [c.token_ids for c in parallel.generate([text], params)] == expected[1:]  # still in step
    finally:
        parallel.runner.workers.close()
