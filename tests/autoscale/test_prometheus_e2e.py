"""The live server's /metrics against what the monitoring assets query, and a real Prometheus
(Debian's package, installed by .ci/run) scraping it: its rules load, PromQL over our metrics
and over the recording rules returns values."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import pytest

from tests.autoscale.conftest import metric_values, ready_server
from tests.deploy.assets import RULE_FILES, dashboard_exprs, rule_exprs, server_metrics_in
from tests.utils import _free_port, image, png_data_url


def _chat(base: str, with_image: bool) -> None:
    content = [{"type": "text", "text": "What is this?"}]
    if with_image:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(image(64, 48, 3))}})
    r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, "stream": True})
    assert r.status_code == 200


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    with ready_server(tiny_ckpt, tmp_path_factory.mktemp("prom_server")) as base:
        _chat(base, with_image=True)
        yield base


def _exported(base: str) -> set[str]:
    names = set()
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("{")[0].split(" ")[0])
    return names


def test_every_metric_the_rules_and_dashboard_query_is_exported(server):
    used = server_metrics_in(rule_exprs() + dashboard_exprs())
    assert len(used) > 20
    missing = used - _exported(server)
    assert not missing, sorted(missing)


def test_the_issue_names_are_exported(server):
    exported = _exported(server)
    for name in ("vlmserve:estimated_queue_wait_seconds", "vlmserve:desired_replicas", "vlmserve:pending_prefill_tokens",
                 "vlmserve:admission_rejections_total", "vllm:num_requests_waiting", "vllm:num_requests_running",
                 "vllm:kv_cache_usage_perc", "vllm:request_queue_time_seconds_bucket",
                 "vllm:request_prefill_time_seconds_bucket", "vllm:request_decode_time_seconds_bucket",
                 "vllm:request_inference_time_seconds_bucket", "vllm:iteration_tokens_total_bucket",
                 "vllm:request_params_n_bucket", "vllm:request_params_max_tokens_bucket",
                 "vlmserve:media_stage_seconds_bucket", "vlmserve:media_failures_total",
                 "vlmserve:request_vision_tokens_bucket", "vlmserve:engine_step_duration_seconds_bucket",
                 "vlmserve:startup_phase_seconds"):
        assert name in exported, name
    text = httpx.get(server + "/metrics").text
    values = metric_values(text)

    def v(name: str) -> float:
        return values[name + '{model_name="tiny"}']

    # One user request (the warm-up is not counted): each phase observed once, and they add up.
    for phase in ("queue", "prefill", "decode", "inference"):
        assert v(f"vllm:request_{phase}_time_seconds_count") >= 1
    assert v("vllm:request_inference_time_seconds_sum") == pytest.approx(
        v("vllm:request_prefill_time_seconds_sum") + v("vllm:request_decode_time_seconds_sum"), abs=1e-6)
    assert v("vllm:request_params_max_tokens_sum") >= 4 and v("vllm:request_params_n_sum") >= 1
    assert v("vlmserve:request_vision_tokens_sum") > 0  # the image's placeholder tokens
    assert v("vllm:iteration_tokens_total_sum") > v("vllm:iteration_tokens_total_count") > 0
    assert v("vlmserve:engine_step_duration_seconds_count") == v("vllm:iteration_tokens_total_count")
    for stage in ("fetch", "decode", "resize", "render"):  # the image request went through each
        count = next(line for line in text.splitlines()
                     if line.startswith("vlmserve:media_stage_seconds_count{") and f'stage="{stage}"' in line)
        assert float(count.rpartition(" ")[2]) >= 1, count


def _query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", r
    return r["data"]["result"]


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed (apt-get install prometheus)")
def test_a_real_prometheus_scrapes_the_server_and_promql_returns_values(server, tmp_path):
    port = _free_port()
    target = server.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{', '.join(repr(str(p)) for p in RULE_FILES)}]\n"
        f"scrape_configs:\n  - job_name: vlmserve\n    static_configs: [{{targets: ['{target}']}}]\n")
    proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=open(tmp_path / "prometheus.log", "w"), stderr=subprocess.STDOUT)
    prom = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60

        def until(expr: str) -> list[dict]:
            while True:
                try:
                    result = _query(prom, expr)
                    if result:
                        return result
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                assert time.monotonic() < deadline, f"no result for {expr!r}\n" + (tmp_path / "prometheus.log").read_text()
                time.sleep(0.25)

        assert until('up{job="vlmserve"} == 1')
        for _ in range(3):  # traffic between scrapes, so rates have something to show
            _chat(server, with_image=True)
            time.sleep(0.4)
        running = until('vllm:num_requests_running{job="vlmserve"}')
        assert running[0]["metric"]["model_name"] == "tiny"
        assert until('vlmserve:pending_prefill_tokens{modality="image"}')
        assert float(until("vlmserve:desired_replicas")[0]["value"][1]) == 1
        assert until("vlmserve:estimated_queue_wait_seconds")
        assert float(until("increase(vllm:generation_tokens_total[1m]) > 0")[0]["value"][1]) > 0
        assert float(until("sum(rate(vlmserve:media_stage_seconds_count[1m])) > 0")[0]["value"][1]) > 0
        assert until("model_name:vllm_request_success:rate5m > 0")  # a recording rule, evaluated
        assert until("model_name:vllm_time_to_first_token_seconds:p99_5m")
        rules = httpx.get(prom + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        health = [r["health"] for g in rules for r in g["rules"]]
        assert len(health) == 30 and set(health) == {"ok"}, health
    finally:
        proc.terminate()
        proc.wait(20)
