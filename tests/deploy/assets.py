"""The monitoring assets under deploy/ and the metric names their queries use."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULE_FILES = [PROMETHEUS / "recording_rules.yml", PROMETHEUS / "alert_rules.yml"]
ALERT_TESTS = PROMETHEUS / "tests" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "vlmserve-dashboard.json"

# Series the server exports: vLLM's and ours. Recording-rule outputs are "level:metric:op"
# (they start with model_name:), Prometheus's own `up` is not the server's.
_SERVER_METRIC = re.compile(r"\b(?:vllm|vlmserve):[A-Za-z0-9_:]+")


def rule_exprs() -> list[str]:
    return [rule["expr"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
            for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def server_metrics_in(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in _SERVER_METRIC.findall(e)}
