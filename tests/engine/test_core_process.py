"""The engine core in its own process (`ProcessCoreClient`) behind `AsyncEngine`: same tokens as
the in-thread core, aborts reach the child, a dead child fails requests instead of hanging
them, and the child never outlives its parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vlmserve.config import EngineConfig
from vlmserve.engine.async_engine import AsyncEngine, EngineDeadError
from vlmserve.engine.core_client import build_core_client
from vlmserve.engine.core_client import EngineStartupError, ProcessCoreClient
from vlmserve.engine.sampling_params import SamplingParams
from tests.utils import image, process_exited, user, wait_process_exited

QUESTIONS = ["What is in this image?", "Describe the colours.", "Where was this taken?"]


def _config(ckpt: Path, mode: str, **overrides) -> EngineConfig:
    base = dict(model=str(ckpt), num_kv_blocks=128, block_size=16, max_model_len=1024, kernel_backend="torch",
                engine_mode=mode)
    return EngineConfig(**{**base, **overrides})


async def _engine(ckpt: Path, mode: str, **overrides) -> AsyncEngine:
    core, frontend = await asyncio.to_thread(build_core_client, _config(ckpt, mode, **overrides))
    engine = AsyncEngine(core, frontend.processor, model_name="tiny")
    await engine.start()
    return engine


async def _greedy_tokens(engine: AsyncEngine) -> list[list[int]]:
    async def one(i: int) -> list[int]:
        img = image(96 + 16 * i, 64, seed=40 + i)
        prompt = await engine.render_chat([user(img, QUESTIONS[i])], [img])
        tokens = []
        async for out in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                                         f"r{i}"):
            tokens += out.token_ids
        return tokens

    return list(await asyncio.gather(*(one(i) for i in range(len(QUESTIONS)))))


async def _long_request(engine: AsyncEngine, request_id: str):
    prompt = await engine.render_completion("Tell me a very long story about a lighthouse")
    return engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=800, ignore_eos=True), request_id)


async def test_process_mode_returns_the_same_greedy_tokens_as_thread_mode(tiny_ckpt):
    results = {}
    for mode in ("thread", "process"):
        engine = await _engine(tiny_ckpt, mode)
        try:
            results[mode] = await _greedy_tokens(engine)
            assert engine.snapshot()["encoded_items"] == len(QUESTIONS)
        finally:
            await engine.shutdown()
    assert all(len(t) == 12 for t in results["thread"])
    assert results["process"] == results["thread"]


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (its threads included), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_abort_frees_the_requests_kv_blocks_in_the_child(tiny_ckpt):
    engine = await _engine(tiny_ckpt, "process")
    try:
        stream = await _long_request(engine, "long")
        for _ in range(3):
            await anext(stream)
        held = engine.snapshot()
        assert held["num_running"] == 1 and held["kv_cache_usage"] > 0
        await stream.aclose()  # what a client disconnect does: abort in the child
        deadline = time.monotonic() + 5
        while engine.snapshot()["num_running"] or engine.snapshot()["kv_cache_usage"]:
            assert time.monotonic() < deadline, engine.snapshot()
            await asyncio.sleep(0.02)
        # Freed by the abort within a few steps, not by running out its ~800 remaining tokens.
        assert engine.snapshot()["steps"] - held["steps"] < 50
        published = []
        engine._on_step = published.append  # every message the child sends from now on
        cpu0 = _process_cpu_seconds(engine.core.pid)
        await asyncio.sleep(1.5)  # longer than the child's idle wait (1 s)
        assert published == []  # idle: the child sends nothing
        idle_cpu = _process_cpu_seconds(engine.core.pid) - cpu0
        assert idle_cpu < 0.1, f"the idle engine process used {idle_cpu:.2f} s of CPU in 1.5 s"
        assert engine.is_healthy()
    finally:
        await engine.shutdown()


async def test_killed_engine_process_fails_pending_requests_fast(tiny_ckpt):
    engine = await _engine(tiny_ckpt, "process")
    try:
        streams = [await _long_request(engine, f"r{i}") for i in range(2)]
        await anext(streams[0])
        os.kill(engine.core.pid, signal.SIGKILL)
        t0 = time.monotonic()
        for stream in streams:
            with pytest.raises(EngineDeadError, match="SIGKILL"):
                async with asyncio.timeout(5):
                    async for _ in stream:
                        pass
        assert time.monotonic() - t0 < 5
        assert not engine.is_healthy() and not engine.is_ready()
        with pytest.raises(EngineDeadError):
            await anext(await _long_request(engine, "after"))
    finally:
        await engine.shutdown()


def test_engine_process_that_cannot_build_reports_its_error(tiny_ckpt):
    config = _config(tiny_ckpt, "process", num_kv_blocks=None, kv_cache_memory_gb=1e-7)
    client = ProcessCoreClient(config, tiny_ckpt)
    try:
        client.send_init([0])
        with pytest.raises(EngineStartupError, match="holds only 0 KV blocks; raise it"):
            client.start(lambda result: None, lambda message: None)
        assert wait_process_exited(client.pid, 5)
    finally:
        client.shutdown()


_PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vlmserve.config import EngineConfig
    from vlmserve.engine.core_client import ProcessCoreClient

    if __name__ == "__main__":
        config = EngineConfig(model=sys.argv[1], num_kv_blocks=32, max_model_len=512, kernel_backend="torch")
        client = ProcessCoreClient(config, Path(sys.argv[1]))
        client.send_init([0])
        client.start(lambda result: None, lambda message: None)
        print(client.pid, flush=True)
        time.sleep(600)
""")


def test_engine_process_exits_when_its_parent_is_killed(tiny_ckpt, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(tiny_ckpt)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        child = int(parent.stdout.readline())
        assert not process_exited(child)
        parent.kill()  # SIGKILL: no shutdown code runs; the child sees its pipe close
        parent.wait(10)
        assert wait_process_exited(child, 5), "the engine process outlived its parent"
    finally:
        parent.kill()
        parent.wait()


def test_engine_mode_is_validated():
    with pytest.raises(ValueError, match="--engine-mode"):
        EngineConfig(engine_mode="fork")


async def test_a_consumer_that_falls_behind_gets_merged_deltas_with_nothing_lost(tiny_ckpt):
    engine = await _engine(tiny_ckpt, "process")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1)
    try:
        prompt = await engine.render_completion("Tell me a story about a lighthouse")

        async def run(request_id: str, delay: float):
            outs = []
            async for out in engine.generate(prompt, params, request_id):
                outs.append(out)
                await asyncio.sleep(delay)
            return outs

        fast = await run("fast", 0)
        slow = await run("slow", 0.05)  # 40 steps take far less than 40 x 50 ms
    finally:
        await engine.shutdown()
    assert len(slow) < len(fast) and any(len(o.token_ids) > 1 for o in slow)
    for outs in (fast, slow):
        assert outs[-1].finished and outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 40
        assert sum(len(o.logprobs) for o in outs) == sum(len(o.token_ids) for o in outs) == 40
        assert not any(o.finished for o in outs[:-1])
    assert [t for o in slow for t in o.token_ids] == [t for o in fast for t in o.token_ids]
    assert "".join(o.text for o in slow) == "".join(o.text for o in fast)
    assert [lp.token_id for o in slow for lp in o.logprobs] == [t for o in fast for t in o.token_ids]
