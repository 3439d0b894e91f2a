"""`python -m loadtests run` against a real tiny vlmserve on loopback: a short spike with
images (half pooled, half unique) and /metrics sampling. The report validates against its
versioned schema, the PNGs are real images, and the report's counts agree with the server's
own counters (an independent measurement of the same run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import matplotlib.image
from prometheus_client.parser import text_string_to_metric_families

from loadtests.report import SCHEMA_FILE
from tests.utils import launch_server

REPO = Path(__file__).resolve().parents[2]


def _counter(text: str, name: str) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_spike_against_vlmserve_writes_a_valid_report(tiny_ckpt, tmp_path):
    out = tmp_path / "run"
    with launch_server(tiny_ckpt, tmp_path, "--kernel-backend", "torch", "--max-pixels", "50176",
                       "--engine-mode", "thread") as base:
        before = httpx.get(base + "/metrics", timeout=10).text
        proc = subprocess.run(
            [sys.executable, "-m", "loadtests", "run", "--base-url", base, "--model", "tiny", "--scenario", "spike",
             "--duration", "5", "--rate", "2", "--spike-factor", "4", "--spike-start", "1.5", "--spike-length", "1.5",
             "--max-tokens", "6", "--ignore-eos", "--slo", "ttft=5,itl=2", "--scrape-metrics",
             "--scrape-interval", "0.5", "--bin-seconds", "0.5", "--out", str(out), "--seed", "3"],
            cwd=REPO, capture_output=True, text=True, timeout=180)
        after = httpx.get(base + "/metrics", timeout=10).text
    assert proc.returncode == 0, proc.stderr
    assert "succeeded" in proc.stdout and "sent" in proc.stderr  # the summary line and the progress bar

    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(SCHEMA_FILE.read_text()))
    req = report["requests"]
    assert req["scheduled"] >= 8 and req["succeeded"] == req["scheduled"], report["errors"]
    assert report["config"]["spike_window_s"] == [1.5, 3.0]
    assert report["latency_s"]["ttft"]["count"] == req["succeeded"]
    assert report["by_cache_intent"].keys() == {"hit", "miss"}
    assert report["server_metrics"]["samples"] and "vllm:num_requests_running" in report["server_metrics"]["samples"][0]
    assert report["goodput"]["good_requests"] <= req["succeeded"]

    # The server's counters saw exactly the run plus the two calibration requests per media kind.
    calib = 2 * len(report["media_tokens_per_item"])
    done = _counter(after, "vllm:request_success_total") - _counter(before, "vllm:request_success_total")
    assert done == req["succeeded"] + calib
    gen = _counter(after, "vllm:generation_tokens_total") - _counter(before, "vllm:generation_tokens_total")
    assert gen == report["tokens"]["completion"] + calib  # calibration asks max_tokens=1
    assert report["tokens"]["completion"] == 6 * req["succeeded"]  # --ignore-eos: all max_tokens
    # Image tokens: usage with the image minus without it, the same for every 224 x 224 image.
    per_image = report["media_tokens_per_item"]["image:224x224"]
    assert per_image > 0
    assert report["tokens"]["image"] == per_image * req["succeeded"]
    assert report["tokens"]["text"] == report["tokens"]["prompt"] - report["tokens"]["image"] > 0

    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == req["scheduled"]
    md = (out / "report.md").read_text()
    assert "![latency](latency.png)" in md and "Client lag" in md
    for name in ("latency.png", "throughput.png", "errors.png"):
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] >= 300 and img.shape[1] >= 800, (name, img.shape)
        assert img[..., :3].std() > 0.05, f"{name} is blank"
