"""`python -m loadtests run ...`: plan the arrivals, build the bodies, calibrate media token
counts, run open loop (with a progress bar and optional /metrics sampling), write the report."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from pathlib import Path

import httpx

from loadtests import media, plots, report, stats
from loadtests.runner import RequestRecord, assign_image_tokens, calibrate_media_tokens, run_open_loop
from loadtests.schedule import Profile, arrival_times
from loadtests.scrape import MetricsSampler
from loadtests.workload import SCENARIOS, Workload, WorkloadOptions


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one scenario against an OpenAI-compatible server")
    r.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (the /v1 prefix is added)")
    r.add_argument("--model", required=True)
    r.add_argument("--scenario", required=True, choices=SCENARIOS)
    r.add_argument("--duration", type=float, required=True, help="seconds of scheduled arrivals")
    r.add_argument("--out", type=Path, required=True, help="directory for report.json, report.md, PNGs")
    r.add_argument("--rate", type=float, default=1.0, help="base arrival rate, requests/s (Poisson)")
    r.add_argument("--spike-factor", type=float, default=10.0, help="spike: rate multiplier in the window")
    r.add_argument("--spike-start", type=float, default=None, help="spike: window start, s (default 1/3 in)")
    r.add_argument("--spike-length", type=float, default=None, help="spike: window length, s (default 1/5)")
    r.add_argument("--ramp-to", type=float, default=None, help="ramp: final rate (default rate x spike-factor)")
    r.add_argument("--image-reuse", type=float, default=0.5,
                   help="fraction of media drawn from a small pool (cache hits); the rest are unique")
    r.add_argument("--turns", type=int, default=4, help="multi-turn: turns per session")
    r.add_argument("--max-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM/vlmserve extension)")
    r.add_argument("--slo", default=None, help="goodput SLO, e.g. ttft=0.5,itl=0.05[,e2e=10] (seconds or ms)")
    r.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default $OPENAI_API_KEY")
    r.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    r.add_argument("--max-connections", type=int, default=2048,
                   help="HTTP connection cap; a request waiting for one is late, and its latency shows it")
    r.add_argument("--scrape-metrics", action="store_true", help="sample the server's /metrics during the run")
    r.add_argument("--metrics-url", default=None, help="default BASE_URL/metrics")
    r.add_argument("--scrape-interval", type=float, default=1.0)
    r.add_argument("--bin-seconds", type=float, default=None, help="time series bin (default duration/60, >= 0.5 s)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-calibrate", action="store_true", help="skip the media token calibration requests")
    r.add_argument("--no-progress", action="store_true")
    return p


def _profile(a: argparse.Namespace) -> Profile:
    kind = a.scenario if a.scenario in ("spike", "ramp") else "steady"
    start = a.duration / 3 if a.spike_start is None else a.spike_start
    length = a.duration / 5 if a.spike_length is None else a.spike_length
    ramp_to = a.rate * a.spike_factor if a.ramp_to is None else a.ramp_to
    return Profile(kind, a.rate, a.duration, a.spike_factor, start, length, ramp_to)


class Progress:
    """One status line on stderr: redrawn in place on a terminal, every 5 s otherwise."""

    def __init__(self, duration: float, total: int, enabled: bool) -> None:
        self.duration, self.total, self.enabled = duration, total, enabled
        self.tty = sys.stderr.isatty()
        self._last = -1e9

    def __call__(self, now: float, records: list[RequestRecord]) -> None:
        if not self.enabled or (not self.tty and now - self._last < 5.0):
            return
        self._last = now
        sent = sum(not math.isnan(r.sent) for r in records)
        done = sum(r.end is not None for r in records)
        failed = sum(r.end is not None and not r.ok for r in records)
        frac = min(max(now / self.duration, 0.0), 1.0) if self.duration else 1.0
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        line = (f"[{bar}] {min(now, self.duration):6.1f}/{self.duration:.0f} s  sent {sent}/{self.total}  "
                f"done {done}  failed {failed}  in flight {sent - done}")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self, now: float, records: list[RequestRecord]) -> None:
        self._last = -1e9
        self(now, records)
        if self.enabled and self.tty:
            sys.stderr.write("\n")


async def _run(a: argparse.Namespace) -> dict:
    profile = _profile(a)
    workload = Workload(a.scenario, WorkloadOptions(a.model, a.max_tokens, a.temperature, a.ignore_eos,
                                                    a.image_reuse, a.turns, a.seed))
    times = arrival_times(profile, a.seed)
    t_build = time.perf_counter()
    plan = [(t, workload.build(i)) for i, t in enumerate(times)]
    build_s = time.perf_counter() - t_build
    base = a.base_url.rstrip("/")
    url = base + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    limits = httpx.Limits(max_connections=a.max_connections, max_keepalive_connections=a.max_connections)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(a.timeout)) as client:
        keys = sorted({k for _, r in plan for k in r.media})
        calibration = {} if a.no_calibrate else await calibrate_media_tokens(
            client, url, {k: workload.calibration_pair(k) for k in keys}, a.timeout)
        sampler = None
        if a.scrape_metrics:
            sampler = MetricsSampler(client, a.metrics_url or base + "/metrics", a.scrape_interval)
        progress = Progress(a.duration, len(plan), not a.no_progress)

        try:
            t0, records = await run_open_loop(client, url, plan, a.timeout, on_tick=progress,
                                              on_start=sampler.start if sampler else None)
        finally:
            if sampler is not None:
                await sampler.stop()
        progress.close(time.perf_counter() - t0, records)
    assign_image_tokens(records, {k: v for k, v in calibration.items() if v is not None})
    lags = [r.lag for r in records if not math.isnan(r.sent)]
    config = {
        "base_url": a.base_url, "model": a.model, "scenario": a.scenario, "duration_s": a.duration,
        "rate": a.rate, "profile": profile.kind, "spike_factor": a.spike_factor if profile.kind == "spike" else None,
        "spike_window_s": list(profile.spike_window()) if profile.spike_window() else None,
        "ramp_to": profile.ramp_to if profile.kind == "ramp" else None, "image_reuse": a.image_reuse,
        "max_tokens": a.max_tokens, "temperature": a.temperature, "ignore_eos": a.ignore_eos, "seed": a.seed,
        "slo": a.slo, "image_sizes": {k: list(v) for k, v in media.SIZES.items()},
    }
    bin_s = a.bin_seconds or max(a.duration / 60, 0.5)
    server = None if sampler is None else {"url": sampler.url, "samples": sampler.samples, "scrape_errors": sampler.errors}
    rep = report.build_report(
        config, records, duration=a.duration, slo=stats.SLO.parse(a.slo),
        client={"lag_s": stats.summary(lags), "build_s": build_s}, calibration=calibration,
        server_metrics=server, bin_s=bin_s)
    report.write(a.out, rep, records)
    plots.write_plots(rep, a.out)
    return rep


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        stats.SLO.parse(a.slo)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rep = asyncio.run(_run(a))
    lat = rep["latency_s"]
    ttft = lat["ttft"]["p99"]
    print(f"{rep['requests']['succeeded']}/{rep['requests']['scheduled']} succeeded; errors {rep['errors'] or 'none'}; "
          f"TTFT p99 {'-' if ttft is None else f'{ttft * 1e3:.0f} ms'}; report in {a.out}/report.md")
    return 0
