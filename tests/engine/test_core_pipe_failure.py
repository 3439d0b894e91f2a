"""A failing pipe thread of `ProcessCoreClient` (an input that cannot be pickled, a reader that
raises) marks the engine dead and ends every request in flight within a second, instead of
leaving them to hang with /health at 200."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from vlmserve.engine import core_client
from vlmserve.engine.client import EngineDeadError
from vlmserve.engine.sampling_params import SamplingParams
from tests.engine.test_core_process import _engine, _long_request
from tests.utils import wait_process_exited


async def _all_fail_within(streams, seconds: float, match: str) -> None:
    t0 = time.monotonic()
    for stream in streams:
        with pytest.raises(EngineDeadError, match=match):
            async with asyncio.timeout(seconds):
                async for _ in stream:
                    pass
    assert time.monotonic() - t0 < seconds


async def test_an_input_that_cannot_be_pickled_marks_the_engine_dead_and_fails_requests_in_flight(tiny_ckpt):
    engine = await _engine(tiny_ckpt, "process")
    try:
        running = await _long_request(engine, "running")
        await anext(running)
        prompt = await engine.render_completion("hello")
        # A prompt carrying something pickle refuses: the writer thread fails on it.
        bad = dataclasses.replace(prompt, prompt_text=lambda: None)
        poisoned = engine.generate(bad, SamplingParams(max_tokens=4), "poisoned")
        await _all_fail_within([poisoned, running], 1.0, "pipe writer failed")
        assert not engine.is_healthy()
        with pytest.raises(EngineDeadError):
            await anext(await _long_request(engine, "after"))
        # The child read EOF on its input pipe and exited on its own.
        assert wait_process_exited(engine.core.pid, 5)
    finally:
        await engine.shutdown()


async def test_a_reader_that_fails_marks_the_engine_dead_and_fails_requests_in_flight(tiny_ckpt, monkeypatch):
    engine = await _engine(tiny_ckpt, "process")
    try:
        streams = [await _long_request(engine, f"r{i}") for i in range(2)]
        await anext(streams[0])

        def recv(conn):
            raise MemoryError("simulated: no memory to unpickle a step")

        monkeypatch.setattr(core_client, "_recv", recv)  # the reader's next message fails
        await _all_fail_within(streams, 1.0, "pipe reader failed")
        assert not engine.is_healthy()
    finally:
        await engine.shutdown()
