"""Entry point of `python -m vlmserve.gpu_check` (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlmserve.gpu_check", description=__doc__)
    p.add_argument("--out", required=True, type=Path, help="directory for report.json, report.md and logs")
    p.add_argument("--dry", action="store_true", help="toy sizes on the CPU: checks that the check starts and reports")
    p.add_argument("--sections", default="env,kernels,parity,graphs,throughput",
                   help="comma-separated subset to run, in this order")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.dry:
        # Triton reads this when first imported: set it before anything imports vlmserve's kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from vlmserve.gpu_check import sections, throughput
    from vlmserve.gpu_check.report import write_report

    import torch

    device = "cuda" if torch.cuda.is_available() and not args.dry else "cpu"
    ctx = sections.Context(out=args.out.resolve(), dry=args.dry, device=device)
    ctx.out.mkdir(parents=True, exist_ok=True)
    runners = {"env": sections.env, "kernels": sections.kernels, "parity": sections.parity,
               "graphs": sections.graphs, "throughput": throughput.throughput}
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry": args.dry, "sections": {}}
    t_all = time.perf_counter()
    for name in args.sections.split(","):
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            result = runners[name](ctx)
        except Exception as e:
            result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report["sections"][name] = result
        print(f"gpu_check: {name}: ok={result['ok']} in {result['seconds']} s", flush=True)
        write_report(ctx.out, report)  # after every section: a killed run still leaves a report
    report["seconds"] = round(time.perf_counter() - t_all, 2)
    report["ok"] = all(s["ok"] is not False for s in report["sections"].values())
    write_report(ctx.out, report)
    print(f"gpu_check: {'passed' if report['ok'] else 'FAILED'}; report in {ctx.out / 'report.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
