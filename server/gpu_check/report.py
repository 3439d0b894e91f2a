"""report.json (everything) and report.md (what a reader looks at first) of a check run."""

from __future__ import annotations

import json
from pathlib import Path

_FIGURES = (  # throughput keys shown in report.md, with their units
    ("decode_tokens_per_s_batch1", "decode tok/s, 1 sequence"),
    ("roofline_decode_tokens_per_s_batch1", "HBM roofline tok/s, 1 sequence"),
    ("decode_fraction_of_roofline", "fraction of roofline"),
    ("decode_tokens_per_s_batched", "decode tok/s, batched"),
    ("prefill_tokens_per_s", "prefill tok/s"),
    ("prefill_mfu", "prefill MFU"),
)


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [f"# GPU check ({'dry run on CPU' if report.get('dry') else 'device'}), {report['started']}", "",
             "| section | ok | seconds | note |", "|---|---|---|---|"]
    for name, s in report["sections"].items():
        note = s.get("error") or s.get("skipped") or s.get("summary") or ""
        lines.append(f"| {name} | {s['ok']} | {s.get('seconds', '')} | {str(note)[:120]} |")
    env = report["sections"].get("env", {})
    if env.get("device"):
        lines += ["", f"Device: {env['device']} (sm {env['capability']}, {env['memory_total_gib']:.0f} GiB), "
                      f"torch {env['torch']}, CUDA {env.get('cuda')}, Triton {env['triton']}"]
    tp = report["sections"].get("throughput", {})
    shown = [(label, tp[key]) for key, label in _FIGURES if key in tp]
    if shown:
        lines += ["", f"Throughput ({tp.get('dtype')}, {tp.get('checkpoint')}):", ""]
        lines += [f"- {label}: {value:.4g}" for label, value in shown]
    for name, fam in report["sections"].get("parity", {}).get("families", {}).items():
        if not fam["ok"]:
            lines.append(f"- parity {name}: {fam.get('error') or 'tokens differ'}")
    (out / "report.md").write_text("\n".join(lines) + "\n")
