"""Health that tells the truth, against the real server on loopback: 503 while loading and
warming up (the warm-up runs the vision encoder before the first 200), a drain under load
that loses nothing, and a wedged engine (SIGSTOP: alive but making no progress) caught by
the watchdog, which ends in-flight streams with an error and turns /health to 503."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx

from tests.autoscale.conftest import engine_pid, metric_values, ready_server
from tests.autoscale.load import Outcome, _one, chat_body
from tests.utils import _free_port


def test_ready_is_503_while_loading_and_warming_up_and_the_warmup_ran_the_encoder(tiny_ckpt, tmp_path):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, VLMSERVE_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "vlmserve", "serve", "--model", str(tiny_ckpt), "--port", str(port),
                             "--served-model-name", "tiny", "--num-kv-blocks", "256", "--max-model-len", "2048"],
                            stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    try:
        seen, refused_while_loading = [], None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(base + "/ready", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.02)
                continue
            seen.append((r.status_code, r.json()["phase"]))
            if r.status_code == 200:
                break
            if r.json()["phase"] == "loading" and refused_while_loading is None:
                refused_while_loading = httpx.post(base + "/v1/chat/completions", json=chat_body(2, stream=True))
                assert httpx.get(base + "/health").status_code == 503
            time.sleep(0.02)
        assert seen and seen[-1] == (200, "serving"), seen
        assert {p for s, p in seen[:-1]} <= {"loading", "warming_up"} and all(s == 503 for s, _ in seen[:-1])
        assert len(seen) > 1, "never saw /ready answer 503 before serving"
        if refused_while_loading is not None:
            assert refused_while_loading.status_code == 503 and refused_while_loading.headers["retry-after"] == "5"
        # No request was served, yet the encoder ran: the warm-up's probe image.
        values = metric_values(httpx.get(base + "/metrics").text)
        assert values['vlmserve:encoder_items_total{model_name="tiny"}'] >= 1
        assert values['vllm:time_to_first_token_seconds_count{model_name="tiny"}'] == 0  # warm-up is not traffic
        assert values['vlmserve:startup_phase_seconds{model_name="tiny",phase="warmup"}'] > 0
        assert values['vlmserve:startup_phase_seconds{model_name="tiny",phase="engine_load"}'] > 0
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0


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
