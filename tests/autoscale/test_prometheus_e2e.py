"""One real server, watched from its start: /ready is 503 while it loads and warms up (the
warm-up runs the vision encoder); then its /metrics against what the monitoring assets query,
and a real Prometheus (Debian's package, installed by .ci/run) scraping it: its rules load,
PromQL over our metrics and over the recording rules returns values."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.autoscale.conftest import metric_values
from tests.deploy.assets import RULE_FILES, dashboard_exprs, rule_exprs, server_metrics_in
from tests.utils import _free_port, image, png_data_url


def _chat(base: str, with_image: bool) -> None:
    content = [{"type": "text", "text": "What is this?"}]
    if with_image:
        content.insert(0, {"type": "image_url", "image_url": {"url": png_data_url(image(64, 48, 3))}})
    r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, "stream": True})
    assert r.status_code == 200


@dataclass
class Started:
    base: str
    seen: list[tuple[int, str]]  # (/ready status, phase) from the first answer to the first 200
    refused_while_loading: httpx.Response | None
    metrics_at_ready: str  # /metrics right after the first 200, before any user request


def _watch_start(base: str, proc: subprocess.Popen) -> Started:
    seen, refused = [], None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = httpx.get(base + "/ready", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.02)
            continue
        seen.append((r.status_code, r.json()["phase"]))
        if r.status_code == 200:
            break
        if r.json()["phase"] == "loading" and refused is None:
            refused = httpx.post(base + "/v1/chat/completions", timeout=10, json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
            assert httpx.get(base + "/health").status_code == 503
        time.sleep(0.02)
    return Started(base, seen, refused, httpx.get(base + "/metrics").text)


@pytest.fixture(scope="module")
def started(tiny_ckpt, tmp_path_factory):
    """One server for the module, watched from its first answer: /ready polled until 200."""
    workdir = tmp_path_factory.mktemp("prom_server")
    port = _free_port()
    env = dict(os.environ, VLMSERVE_CACHE=str(workdir / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "vlmserve", "serve", "--model", str(tiny_ckpt), "--port", str(port),
                             "--served-model-name", "tiny", "--num-kv-blocks", "256", "--max-model-len", "2048"],
                            stdout=open(workdir / "server.log", "w"), stderr=subprocess.STDOUT, env=env)
    try:
        yield _watch_start(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, (workdir / "server.log").read_text()


@pytest.fixture(scope="module")
def server(started):
    assert started.seen and started.seen[-1][0] == 200, started.seen
    _chat(started.base, with_image=True)
    return started.base


def test_ready_is_503_while_loading_and_warming_up_and_the_warmup_ran_the_encoder(started):
    seen = started.seen
    assert seen and seen[-1] == (200, "serving"), seen
    assert len(seen) > 1, "never saw /ready answer 503 before serving"
    assert {p for _, p in seen[:-1]} <= {"loading", "warming_up"} and all(s == 503 for s, _ in seen[:-1])
    if started.refused_while_loading is not None:
        r = started.refused_while_loading
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
    # No request was served yet, but the encoder ran: the warm-up's probe image.
    values = metric_values(started.metrics_at_ready)
    assert values['vlmserve:encoder_items_total{model_name="tiny"}'] >= 1
    assert values['vllm:time_to_first_token_seconds_count{model_name="tiny"}'] == 0  # warm-up is not traffic
    assert values['vlmserve:startup_phase_seconds{model_name="tiny",phase="warmup"}'] > 0
    assert values['vlmserve:startup_phase_seconds{model_name="tiny",phase="engine_load"}'] > 0


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
