"""PNG plots of a run (matplotlib's Agg backend: no display needed):
latency.png (TTFT/E2E percentiles and the queue over time), throughput.png, errors.png.
The spike window, when the scenario has one, is shaded on every plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _shade(ax, spike: tuple[float, float] | None) -> None:
    if spike:
        ax.axvspan(spike[0], spike[1], color="tab:red", alpha=0.12, label="spike window")


def _nan(values):
    return [float("nan") if v is None else v for v in values]


def write_plots(report: dict, out: Path) -> list[str]:
    ts = report["timeseries"]
    t = ts["t"]
    spike = tuple(report["config"]["spike_window_s"]) if report["config"].get("spike_window_s") else None
    title = f"{report['config']['scenario']} on {report['config']['model']}"
    written = []

    fig, (ax, axq) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for key, style in (("ttft_p50", "-"), ("ttft_p99", "--"), ("e2e_p50", "-"), ("e2e_p99", "--")):
        ax.plot(t, _nan(ts[key]), style, marker=".", label=key.replace("_", " "))
    _shade(ax, spike)
    ax.set_ylabel("seconds (from intended send)")
    ax.set_title(f"{title}: latency of successful requests, by scheduled time")
    ax.legend(loc="upper left", fontsize=8)
    axq.plot(t, ts["inflight"], marker=".", label="client in flight")
    server = report.get("server_metrics") or {}
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running"):
        pts = [(s["t"], s[name]) for s in server.get("samples", []) if name in s]
        if pts:
            axq.plot(*zip(*pts), label=f"server {name.split(':')[1]}")
    _shade(axq, spike)
    axq.set_xlabel("seconds since start")
    axq.set_ylabel("requests")
    axq.set_title("queue")
    axq.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=100)
    plt.close(fig)
    written.append("latency.png")

    fig, ax = plt.subplots(figsize=(10, 4))
    bin_s = ts["bin_s"]
    ax.plot(t, [a / bin_s for a in ts["arrivals"]], label="offered req/s")
    ax.plot(t, [c / bin_s for c in ts["completions"]], label="completed req/s")
    ax2 = ax.twinx()
    ax2.plot(t, ts["output_tokens_per_s"], color="tab:green", alpha=0.6, label="output tokens/s")
    ax2.set_ylabel("tokens/s")
    _shade(ax, spike)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("requests/s")
    ax.set_title(f"{title}: throughput")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=100)
    plt.close(fig)
    written.append("throughput.png")

    fig, ax = plt.subplots(figsize=(10, 4))
    ended = [c + e for c, e in zip(ts["completions"], ts["errors"])]
    ax.bar(t, [e / bin_s for e in ts["errors"]], width=bin_s * 0.9, color="tab:red", label="errors/s")
    ax.set_ylim(bottom=0)
    ax3 = ax.twinx()
    ax3.plot(t, [e / n if n else 0 for e, n in zip(ts["errors"], ended)], color="black", marker=".",
             label="error fraction")
    ax3.set_ylim(0, 1.05)
    ax3.set_ylabel("fraction of requests ended")
    _shade(ax, spike)
    counts = ", ".join(f"{k}: {v}" for k, v in report["errors"].items()) or "none"
    ax.set_title(f"{title}: errors ({counts})")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("errors/s")
    lines = ax.get_legend_handles_labels()
    lines3 = ax3.get_legend_handles_labels()
    ax.legend(lines[0] + lines3[0], lines[1] + lines3[1], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "errors.png", dpi=100)
    plt.close(fig)
    written.append("errors.png")
    return written
