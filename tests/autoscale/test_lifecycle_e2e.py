"""Health that tells the truth, against the real server on loopback: a drain under load that
loses nothing, and a wedged engine (SIGSTOP: alive but making no progress) caught by the
watchdog, which ends in-flight streams with an error and turns /health to 503. (503 while
loading and warming up: test_prometheus_e2e.py, which watches its server start.)"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx

from tests.autoscale.conftest import engine_pid, ready_server
from tests.autoscale.load import Outcome, _one, chat_body


def test_sigterm_under_load_flips_ready_first_loses_nothing_and_exits_0(tiny_ckpt, tmp_path):
    procs = []
    with ready_server(tiny_ckpt, tmp_path, "--drain-seconds", "2", procs=procs) as base:
        (proc,) = procs

        async def run() -> tuple[list[Outcome], float, Outcome]:
            url = base + "/v1/chat/completions"
            async with httpx.AsyncClient(timeout=60) as c:
                outs = [Outcome(start=0.0, phase="before") for _ in range(6)]
                t0 = time.monotonic()
                tasks = [asyncio.create_task(_one(c, url, chat_body(160), o, t0)) for o in outs]
                while not all(o.ttft is not None for o in outs):  # all six are streaming
                    assert not any(t.done() for t in tasks), "a request finished before the signal"
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                t_sig = time.monotonic()
                while (await c.get(base + "/ready")).status_code != 503:
                    await asyncio.sleep(0.02)
                flipped = time.monotonic() - t_sig
                assert not all(t.done() for t in tasks), "nothing was in flight when /ready flipped"
                during = Outcome(start=0.0, phase="draining")  # a late request the balancer still sent
                await _one(c, url, chat_body(4), during, time.monotonic())
                await asyncio.gather(*tasks)
                return outs, flipped, during

        outs, flipped, during = asyncio.run(run())
        assert flipped < 1.0
        for o in outs + [during]:
            assert o.status == 200 and o.done and o.finish_reason == "length" and o.error is None, o
        assert proc.wait(30) == 0


def test_a_wedged_engine_trips_the_watchdog_ends_streams_and_health_turns_503(tiny_ckpt, tmp_path):
    with ready_server(tiny_ckpt, tmp_path, "--engine-watchdog-s", "2") as base:
        pid = engine_pid(tmp_path)

        async def run() -> tuple[Outcome, float]:
            async with httpx.AsyncClient(timeout=30) as c:
                out = Outcome(start=0.0, phase="wedged")
                t0 = time.monotonic()
                task = asyncio.create_task(_one(c, base + "/v1/chat/completions", chat_body(2000), out, t0))
                while out.ttft is None:
                    await asyncio.sleep(0.02)
                os.kill(pid, signal.SIGSTOP)  # alive, pipe open, no progress
                t_stop = time.monotonic()
                await task
                return out, time.monotonic() - t_stop

        try:
            out, ended_after = asyncio.run(run())
            assert out.status == 200 and out.done and out.error is not None and out.finish_reason is None, out
            assert ended_after < 6, ended_after
            h = httpx.get(base + "/health")
            assert h.status_code == 503 and "no progress" in h.json()["error"]["message"]
            assert httpx.get(base + "/ready").json() == {"ready": False, "phase": "dead"}
            r = httpx.post(base + "/v1/chat/completions", json=chat_body(2, stream=True), timeout=10)
            assert r.status_code == 503
        finally:
            os.kill(pid, signal.SIGKILL)  # the child we stopped (SIGKILL works on a stopped process)
