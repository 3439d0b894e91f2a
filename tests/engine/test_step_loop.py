"""The step loop (`run_step_loop` via `ThreadCoreClient`) sleeps on its inputs when a step could
do nothing: a stalled engine uses no CPU and publishes nothing, and wakes up at
once on an input. Driven with a real Scheduler and a hand-built runner (no model)."""

from __future__ import annotations

import threading
import time

from vlmserve.config import EngineConfig
from vlmserve.engine.core_client import ThreadCoreClient
from vlmserve.engine.engine_core import EngineCore
from vlmserve.engine.scheduler import Scheduler
from tests.engine.fake_runner import FakeRunner
from tests.engine.test_scheduler import make_request


def _thread_cpu_seconds(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def test_a_stalled_engine_sleeps_publishes_nothing_and_wakes_on_an_input():
    sched = Scheduler(EngineConfig(block_size=4), num_kv_blocks=8, max_model_len=64)
    runner = FakeRunner(sched)
    client = ThreadCoreClient(EngineCore(sched, runner), max_model_len=64, num_kv_blocks=8)
    published, done = [], threading.Event()

    def on_step(result):
        published.append(result)
        if not result.stats["num_waiting"] and len(published) > 1:
            done.set()

    # Something outside the scheduler holds every KV block: the request can never be admitted.
    held = sched.kv_cache.pool.get_new_blocks(8)
    client.start(on_step, lambda message: None)
    try:
        client.add_request(make_request("r", 6, max_tokens=2, ignore_eos=True))
        time.sleep(0.3)  # the add is applied and published once; then nothing changes
        n_published, n_steps = len(published), runner.num_executed
        cpu0 = _thread_cpu_seconds(client._thread)
        time.sleep(1.0)
        cpu = _thread_cpu_seconds(client._thread) - cpu0
        assert len(published) == n_published <= 1
        assert runner.num_executed - n_steps <= 3  # one retry per input timeout (0.5 s)
        assert cpu < 0.05, f"the stalled step loop used {cpu:.2f} s of CPU in 1 s"
        # An input wakes it at once: the abort is applied and published without waiting.
        t0 = time.monotonic()
        client.abort_requests(["r"])
        assert done.wait(1) and time.monotonic() - t0 < 0.3
        assert not sched.has_unfinished_requests()
    finally:
        client.shutdown()
