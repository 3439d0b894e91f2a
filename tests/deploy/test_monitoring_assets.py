"""deploy/prometheus and deploy/grafana: the rules parse and their alert unit tests pass
(promtool, from Debian's `prometheus` package, which .ci/run installs), and the dashboard is
well formed, with every counter read through rate()."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.deploy.assets import ALERT_TESTS, RULE_FILES, dashboard, dashboard_exprs, rule_exprs, server_metrics_in

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed (apt-get install prometheus)")


@needs_promtool
def test_promtool_check_rules_passes():
    out = subprocess.run([promtool, "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(RULE_FILES)


@needs_promtool
def test_promtool_alert_unit_tests_pass():
    out = subprocess.run([promtool, "test", "rules", str(ALERT_TESTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    import yaml

    alerts = {rule["alert"] for group in yaml.safe_load(RULE_FILES[1].read_text())["groups"] for rule in group["rules"]}
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", []) if case["exp_alerts"]}
    assert alerts == fired


def test_dashboard_has_the_four_sections_unique_ids_and_queries_everywhere():
    dash = dashboard()
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == ["Overview (SLO)", "Saturation", "Multimodal", "Autoscaling"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    assert sum(p["type"] == "stat" for p in dash["panels"]) >= 5  # the SLO tiles


def test_counters_are_only_read_through_rate():
    for expr in dashboard_exprs() + rule_exprs():
        for name in re.findall(r"[A-Za-z0-9_:]+(?:_total|_bucket|_sum|_count)\b", expr):
            # The counter sits inside rate(...[window]).
            assert re.search(r"rate\(\s*" + re.escape(name) + r"\{[^}]*\}\[|rate\(\s*" + re.escape(name) + r"\[", expr), (
                name, expr)


def test_queries_use_vllm_names_for_what_vllm_has():
    used = server_metrics_in(dashboard_exprs() + rule_exprs())
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total"):
        assert name in used
