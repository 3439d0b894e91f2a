"""Every metric the deploy assets query — KEDA triggers, the HPA through prometheus-adapter's
rules, and the Prometheus rules and Grafana dashboards under deploy/ — is one a live server
exports. Scrapes a real tiny `vlmserve serve` on loopback."""

from __future__ import annotations

import json
import re

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.manifests import KUBE, REPO, find, render
from tests.utils import launch_server

# Our namespaces: anything else (up, kube_*) is Prometheus' or Kubernetes' own.
_METRIC = re.compile(r"\b(?:vllm|vlmserve):[A-Za-z0-9_:]+")


def _rule_docs() -> list[dict]:
    docs = []
    for path in sorted((REPO / "deploy").rglob("*.y*ml")):
        if KUBE in path.parents or "test" in path.name:
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return docs


def queried_metrics() -> dict[str, set[str]]:
    """metric name -> where it is queried."""
    where: dict[str, set[str]] = {}

    def add(text: str, source: str) -> None:
        for name in _METRIC.findall(text):
            where.setdefault(name, set()).add(source)

    (so,) = find(render("autoscaled/qwen2-vl-7b-keda"), "ScaledObject")
    for trig in so["spec"]["triggers"]:
        add(trig["metadata"]["query"], f"ScaledObject trigger {trig['name']}")
    adapter = yaml.safe_load((KUBE / "prometheus-adapter" / "values.yaml").read_text())
    served = {}
    for rule in adapter["rules"]["custom"]:
        series = rule["seriesQuery"].split("{")[0]
        add(series, "prometheus-adapter rule")
        served[re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)] = series
    (hpa,) = find(render("autoscaled/qwen2-vl-7b-hpa"), "HorizontalPodAutoscaler")
    for m in hpa["spec"]["metrics"]:
        add(served[m["pods"]["metric"]["name"]], "HPA (through prometheus-adapter)")
    # deploy/prometheus: plain rule files or PrometheusRule objects; a recorded series is
    # defined there, not exported by the server.
    recorded = set()
    for doc in _rule_docs():
        groups = doc.get("groups") or (doc.get("spec") or {}).get("groups") or []
        for group in groups:
            for rule in group.get("rules", []):
                if "record" in rule:
                    recorded.add(rule["record"])
                add(str(rule.get("expr", "")), f"Prometheus rule {rule.get('record') or rule.get('alert')}")
    for path in sorted((REPO / "deploy").rglob("*.json")):
        for expr in re.findall(r'"expr"\s*:\s*"((?:[^"\\]|\\.)*)"', path.read_text()):
            add(json.loads(f'"{expr}"'), f"dashboard {path.name}")
    return {name: src for name, src in where.items() if name not in recorded}


def exported_metrics(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_every_queried_metric_is_exported_by_a_live_server(tiny_ckpt, tmp_path):
    wanted = queried_metrics()
    # The autoscaling signals, at least, are among them.
    assert {"vlmserve:estimated_queue_wait_seconds", "vllm:kv_cache_usage_perc",
            "vllm:num_requests_waiting", "vlmserve:desired_replicas"} <= wanted.keys()
    with launch_server(tiny_ckpt, tmp_path, "--engine-mode", "thread") as base:
        text = httpx.get(base + "/metrics", timeout=10).text
    exported = exported_metrics(text)
    assert "vllm:num_requests_running" in exported  # the scrape parsed
    missing = {name: sorted(src) for name, src in wanted.items() if name not in exported}
    assert not missing, f"queried but not exported by the server: {missing}"
