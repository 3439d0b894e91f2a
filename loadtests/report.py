"""report.json (versioned: `schema` + `schema_version`, described by report_schema.json),
report.md (the same figures as tables), and requests.jsonl (one line per request)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from loadtests import REPORT_SCHEMA, REPORT_SCHEMA_VERSION, stats
from loadtests.runner import RequestRecord

SCHEMA_FILE = Path(__file__).with_name("report_schema.json")


def build_report(config: dict, records: list[RequestRecord], *, duration: float, slo: stats.SLO | None,
                 client: dict, calibration: dict, server_metrics: dict | None, bin_s: float) -> dict:
    ok = [r for r in records if r.ok]
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_SCHEMA_VERSION,
        "config": config,
        "requests": {"scheduled": len(records), "sent": sum(not math.isnan(r.sent) for r in records),
                     "succeeded": len(ok), "failed": len(records) - len(ok)},
        "errors": stats.errors(records),
        "latency_s": stats.latencies(records),
        "client": client,
        "throughput": stats.throughput(records, duration),
        "goodput": stats.goodput(records, slo, duration),
        "tokens": stats.tokens(records),
        "media_tokens_per_item": calibration,
        "by_cache_intent": stats.by_group(records, lambda r: r.cache),
        "by_kind": stats.by_group(records, lambda r: r.kind),
        "timeseries": stats.timeseries(records, duration, bin_s),
        "server_metrics": server_metrics,
    }


def _fmt(v, scale: float = 1.0, unit: str = "") -> str:
    return "-" if v is None else f"{v * scale:.1f}{unit}" if scale != 1.0 else f"{v:.3g}{unit}"


def markdown(report: dict) -> str:
    c, req, thr = report["config"], report["requests"], report["throughput"]
    lines = [
        f"# Load test: {c['scenario']} against {c['model']}",
        "",
        f"{c['base_url']}, {c['duration_s']} s scheduled at {c['rate']} req/s base"
        + (f", x{c['spike_factor']} during {c['spike_window_s']} s" if c.get("spike_window_s") else "")
        + "; open loop, latencies timed from each request's intended send time.",
        "",
        f"Requests: {req['scheduled']} scheduled, {req['succeeded']} succeeded, {req['failed']} failed.",
        "",
        "| latency (successes only) | count | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["latency_s"].items():
        lines.append(f"| {name} | {s['count']} | {_fmt(s['p50'], 1e3)} | {_fmt(s['p90'], 1e3)} | "
                     f"{_fmt(s['p99'], 1e3)} | {_fmt(s['max'], 1e3)} |")
    lag = report["client"]["lag_s"]
    lines += ["", f"Client lag (actual - intended send): p50 {_fmt(lag['p50'], 1e3)} ms, p99 {_fmt(lag['p99'], 1e3)} ms,"
              f" max {_fmt(lag['max'], 1e3)} ms.", "",
              "| throughput | value |", "|---|---|",
              f"| offered req/s | {_fmt(thr['offered_rps'])} |", f"| completed req/s | {_fmt(thr['completed_rps'])} |",
              f"| output tokens/s | {_fmt(thr['output_tokens_per_s'])} |",
              f"| prompt tokens/s | {_fmt(thr['prompt_tokens_per_s'])} |"]
    g = report["goodput"]
    if g:
        lines += ["", f"Goodput under {g['slo']}: {g['good_requests']} requests, {_fmt(g['good_rps'])} req/s "
                  f"({_fmt(g['fraction_of_all'], 100)} % of all)."]
    tok = report["tokens"]
    lines += ["", f"Tokens (from the server's usage): prompt {tok['prompt']} (text {tok['text']}, image/video "
              f"{tok['image']}, cached {tok['cached_prompt']}), completion {tok['completion']}.",
              f"Media tokens per item (usage with minus without the item): {report['media_tokens_per_item']}."]
    lines += ["", "| errors | count |", "|---|---|"] + [f"| {k} | {v} |" for k, v in report["errors"].items()]
    if not report["errors"]:
        lines.append("| none | 0 |")
    lines += ["", "| cache intent | requests | failed | TTFT p50 ms | TTFT p99 ms |", "|---|---|---|---|---|"]
    for k, v in report["by_cache_intent"].items():
        lines.append(f"| {k} | {v['requests']} | {v['failed']} | {_fmt(v['ttft']['p50'], 1e3)} | "
                     f"{_fmt(v['ttft']['p99'], 1e3)} |")
    lines += ["", "![latency](latency.png)", "", "![throughput](throughput.png)", "", "![errors](errors.png)", ""]
    return "\n".join(lines)


def write(out: Path, report: dict, records: list[RequestRecord]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    with open(out / "requests.jsonl", "w") as fh:
        for r in records:
            row = asdict(r)
            row.update(ttft=r.ttft, e2e=r.e2e, tpot=r.tpot, lag=None if math.isnan(r.lag) else r.lag)
            row["sent"] = None if math.isnan(r.sent) else r.sent
            fh.write(json.dumps(row) + "\n")
