"""The prepared GPU check's dry mode: every section starts, runs at toy sizes on the CPU and
lands in the report, so a lent GPU's minutes are not spent debugging the check itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vlmserve.gpu_check.hardware import peaks_for


def test_dry_run_writes_a_report_with_every_section(tmp_path) -> None:
    out = tmp_path / "report"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "vlmserve.gpu_check", "--dry", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["env", "kernels", "parity", "graphs", "throughput"]
    assert sections["kernels"]["ok"] and sections["kernels"]["tests"] >= 1 and not sections["kernels"]["failed"]
    fam = sections["parity"]["families"]["qwen2_vl"]
    assert fam["ok"] and fam["triton"] == fam["reference"] and all(len(t) == 12 for t in fam["triton"])
    tp = sections["throughput"]
    assert tp["ok"] and tp["decode_tokens_per_s_batch1"] > 0 and tp["prefill_tokens"] > 32
    assert tp["offline_bench"]["requests"] == 4
    assert "| parity | True |" in (out / "report.md").read_text()


def test_device_peaks_are_matched_by_name_and_unknown_devices_get_none() -> None:
    assert peaks_for("NVIDIA H200").hbm_bytes_per_s == 4.8e12
    assert peaks_for("NVIDIA H100 80GB HBM3").name == "H100"
    assert peaks_for("NVIDIA GeForce RTX 4090") is None
