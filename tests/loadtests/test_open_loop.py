"""The open-loop runner against a fake server whose behaviour is known: queueing at a slow
serial server shows in the latencies (timed from the intended send), the client's own stalls
are reported as lag and counted in the latencies too, and failures are counted by kind and
kept out of the percentiles."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from loadtests import stats
from loadtests.runner import run_open_loop
from loadtests.workload import PlannedRequest
from tests.loadtests.fake_server import FakeServer


def _plan(outcomes: list[str], gap: float) -> list[tuple[float, PlannedRequest]]:
    body = lambda i, o: {"model": "fake", "stream": True, "messages": [{"role": "user", "content": f"r{i}:{o}"}]}
    return [(i * gap, PlannedRequest(i, "text", body(i, o), (), None)) for i, o in enumerate(outcomes)]


def _run(base: str, plan, on_tick=None):
    async def go():
        async with httpx.AsyncClient(timeout=30) as client:
            return await run_open_loop(client, base + "/v1/chat/completions", plan, timeout=30, on_tick=on_tick)
    return asyncio.run(go())


def test_queueing_at_a_slow_server_is_in_the_latencies():
    # 12 requests every 0.1 s into a server that serves one per 0.25 s: the k-th waits for
    # the k before it, so its latency grows ~0.15 s per request (a closed-loop client would
    # report ~0.25 s for all and send at the server's pace instead).
    fake = FakeServer(service_s=0.25)
    with fake.running() as base:
        t0, recs = _run(base, _plan(["ok"] * 12, 0.1))
    assert all(r.ok for r in recs), [r.error for r in recs]
    served = {e["tag"]: e for e in fake.log}
    for r in recs:
        server_done = served[f"r{r.index}"]["finish"] - t0
        # From the intended send to the server's last byte, give or take the loopback hop.
        assert abs(r.e2e - (server_done - r.intended)) < 0.05, (r.index, r.e2e, server_done - r.intended)
    order = sorted(recs, key=lambda r: served[f"r{r.index}"]["finish"])
    waits = [r.e2e for r in order]
    assert waits[-1] > 12 * 0.25 - 11 * 0.1 - 0.3, waits  # ~1.9 s of queueing for the last one
    summary = stats.latencies(recs)["e2e"]
    assert summary["p99"] > 4 * 0.25 and summary["p50"] > 0.25
    assert stats.latencies(recs)["ttft"]["count"] == 12
    # Client lag stays small when the client is not the bottleneck.
    assert max(r.lag for r in recs) < 0.1


def test_client_stall_is_reported_as_lag_and_counted_in_latency():
    stalled = []

    def stall(now, records):  # one 0.6 s block of the client's event loop, 0.5 s in
        if now > 0.45 and not stalled:
            stalled.append(now)
            time.sleep(0.6)

    fake = FakeServer(service_s=0.02, tokens=2)
    with fake.running() as base:
        _, recs = _run(base, _plan(["ok"] * 20, 0.05), on_tick=stall)
    assert stalled and all(r.ok for r in recs)
    late = [r for r in recs if r.lag > 0.3]
    assert late, [round(r.lag, 3) for r in recs]
    for r in late:
        # Timed from the intended send: the stall is part of what the request experienced.
        assert r.e2e >= r.lag + 0.015 and r.ttft >= r.lag
    assert stats.summary([r.lag for r in recs])["max"] >= 0.4


def test_errors_are_counted_by_kind_and_kept_out_of_percentiles():
    outcomes = ["ok", "429", "ok", "503", "500", "stream-error", "ok", "no-usage", "429", "ok"]
    fake = FakeServer(service_s=0.2, tokens=4)
    with fake.running() as base:
        _, recs = _run(base, _plan(outcomes, 0.02))
    assert stats.errors(recs) == {"http:429": 2, "http:500": 1, "http:503": 1, "stream:internal_error": 1,
                                  "stream:no_usage": 1}
    ok = [r for r in recs if r.ok]
    assert [r.index for r in ok] == [i for i, o in enumerate(outcomes) if o == "ok"]
    lat = stats.latencies(recs)
    assert lat["ttft"]["count"] == lat["e2e"]["count"] == 4
    # The fast 4xx/5xx (a few ms) would pull the median down if they were mixed in.
    assert lat["e2e"]["p50"] >= 0.2 and lat["ttft"]["p50"] >= 0.05
    assert stats.tokens(recs)["completion"] == 4 * 4
    slo = stats.SLO.parse("ttft=10,itl=5")
    assert stats.goodput(recs, slo, duration=0.2)["good_requests"] == 4


@pytest.mark.parametrize("spec,expected", [("ttft=0.5,itl=50ms", (0.5, 0.05, None)), ("e2e=2s", (None, None, 2.0))])
def test_slo_parsing(spec, expected):
    slo = stats.SLO.parse(spec)
    assert (slo.ttft, slo.itl, slo.e2e) == expected
    with pytest.raises(ValueError, match="--slo"):
        stats.SLO.parse("tpot=1")
