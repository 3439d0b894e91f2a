"""Summaries of a run's records. Latency percentiles are over successful requests only;
failures are counted by kind (HTTP status, transport error, stream error) apart. Goodput
counts successes that met every SLO given (TTFT, per-request time per output token, E2E)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from loadtests.runner import RequestRecord

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class SLO:
    ttft: float | None = None
    itl: float | None = None  # compared with each request's mean time per output token
    e2e: float | None = None

    @classmethod
    def parse(cls, spec: str | None) -> "SLO | None":
        """'ttft=0.5,itl=0.05[,e2e=10]' in seconds (a trailing 'ms' means milliseconds)."""
        if not spec:
            return None
        values = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, raw = part.partition("=")
            if not sep or key not in ("ttft", "itl", "e2e"):
                raise ValueError(f"--slo expects ttft=S,itl=S,e2e=S; got {part!r}")
            raw = raw.strip()
            values[key] = float(raw[:-2]) / 1000 if raw.endswith("ms") else float(raw.rstrip("s"))
        return cls(**values)

    def met(self, rec: RequestRecord) -> bool:
        if not rec.ok:
            return False
        checks = ((self.ttft, rec.ttft), (self.itl, rec.tpot), (self.e2e, rec.e2e))
        return all(limit is None or (value is not None and value <= limit) for limit, value in checks)


def summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": None, "max": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=float)
    out = {"count": int(arr.size), "mean": float(arr.mean()), "max": float(arr.max())}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES})
    return out


def latencies(records: list[RequestRecord]) -> dict:
    ok = [r for r in records if r.ok]
    return {
        "ttft": summary([r.ttft for r in ok if r.ttft is not None]),
        "itl": summary([g for r in ok for g in r.itls]),
        "tpot": summary([r.tpot for r in ok if r.tpot is not None]),
        "e2e": summary([r.e2e for r in ok if r.e2e is not None]),
    }


def errors(records: list[RequestRecord]) -> dict[str, int]:
    return dict(sorted(Counter(r.error for r in records if r.error).items()))


def tokens(records: list[RequestRecord]) -> dict:
    ok = [r for r in records if r.ok]
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    image = sum(r.image_tokens or 0 for r in ok)
    known = all(r.image_tokens is not None for r in ok if r.media)
    return {
        "prompt": prompt,
        "completion": sum(r.completion_tokens or 0 for r in ok),
        "cached_prompt": sum(r.cached_tokens or 0 for r in ok),
        "image": image if known else None,
        "text": prompt - image if known else None,
    }


def window(records: list[RequestRecord], duration: float) -> float:
    """Seconds from t0 until the last request ended (at least the scheduled duration)."""
    ends = [r.end for r in records if r.end is not None]
    return max([duration, *ends])


def throughput(records: list[RequestRecord], duration: float) -> dict:
    span = window(records, duration)
    ok = [r for r in records if r.ok]
    tok = tokens(records)
    return {
        "window_s": span,
        "offered_rps": len(records) / duration if duration else None,
        "completed_rps": len(ok) / span,
        "output_tokens_per_s": tok["completion"] / span,
        "prompt_tokens_per_s": tok["prompt"] / span,
    }


def goodput(records: list[RequestRecord], slo: SLO | None, duration: float) -> dict | None:
    if slo is None:
        return None
    good = sum(slo.met(r) for r in records)
    return {"slo": {"ttft": slo.ttft, "itl": slo.itl, "e2e": slo.e2e}, "good_requests": good,
            "good_rps": good / window(records, duration),
            "fraction_of_all": good / len(records) if records else None}


def by_group(records: list[RequestRecord], key) -> dict[str, dict]:
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        k = key(r)
        if k is not None:
            groups.setdefault(str(k), []).append(r)
    return {k: {"requests": len(v), "failed": sum(not r.ok for r in v), **{
        name: {p: s[p] for p in ("count", "p50", "p99")} for name, s in latencies(v).items() if name != "itl"}}
        for k, v in sorted(groups.items())}


def timeseries(records: list[RequestRecord], duration: float, bin_s: float) -> dict:
    """Per bin of `bin_s` seconds (`t` holds the centres): arrivals, completions and errors
    (by end), in flight at the centre, output tokens/s, and the TTFT/E2E percentiles of the
    requests scheduled in the bin."""
    nbins = max(int(math.ceil(window(records, duration) / bin_s)), 1)
    t = [round((i + 0.5) * bin_s, 6) for i in range(nbins)]  # bin centres
    out = {k: [0] * nbins for k in ("arrivals", "completions", "errors", "inflight")}
    out["output_tokens_per_s"] = [0.0] * nbins
    sched: list[list[RequestRecord]] = [[] for _ in range(nbins)]
    for r in records:
        b = min(int(r.intended // bin_s), nbins - 1)
        out["arrivals"][b] += 1
        sched[b].append(r)
        if r.end is not None:
            e = min(int(r.end // bin_s), nbins - 1)
            out["errors" if not r.ok else "completions"][e] += 1
            if r.ok:
                out["output_tokens_per_s"][e] += (r.completion_tokens or 0) / bin_s
    for i, edge in enumerate(t):
        out["inflight"][i] = sum(1 for r in records if r.intended <= edge and (r.end is None or r.end > edge))
    for name in ("ttft", "e2e"):
        for p in (50, 99):
            series = []
            for group in sched:
                vals = [getattr(r, name) for r in group if r.ok and getattr(r, name) is not None]
                series.append(float(np.percentile(vals, p)) if vals else None)
            out[f"{name}_p{p}"] = series
    return {"bin_s": bin_s, "t": t, **out}
