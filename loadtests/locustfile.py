"""Locust users for the same workloads: `locust -f loadtests/locustfile.py --host URL`, from
the repository root (so `loadtests` imports). Pick the scenario and model with
LOADTEST_SCENARIO / LOADTEST_MODEL (defaults: steady, the server's first model).

Locust is closed loop: each user waits for its answer before sending again, so under
overload it sends less and its latencies understate the queue (coordinated omission). Use
`python -m loadtests run` for open-loop figures; this file is for teams whose tooling is
locust. TTFT is reported as its own request type ("TTFT"), next to the whole request.
"""

from __future__ import annotations

import itertools
import json
import os
import time

from locust import HttpUser, between, events, task

from loadtests.workload import Workload, WorkloadOptions

_counter = itertools.count()


class VLMUser(HttpUser):
    wait_time = between(0.0, 0.5)

    def on_start(self) -> None:
        model = os.environ.get("LOADTEST_MODEL") or self.client.get("/v1/models").json()["data"][0]["id"]
        opts = WorkloadOptions(model=model, max_tokens=int(os.environ.get("LOADTEST_MAX_TOKENS", "64")))
        self.workload = Workload(os.environ.get("LOADTEST_SCENARIO", "steady"), opts)

    @task
    def chat(self) -> None:
        req = self.workload.build(next(_counter))
        start = time.perf_counter()
        first = None
        with self.client.post("/v1/chat/completions", json=req.body, stream=True, name=req.kind,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            for line in resp.iter_lines():
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                obj = json.loads(line[5:])
                if "error" in obj:
                    resp.failure(f"stream error: {obj['error']}")
                    return
                if first is None and any((c.get("delta") or {}).get("content") for c in obj.get("choices") or []):
                    first = time.perf_counter()
            resp.success()
        if first is not None:
            events.request.fire(request_type="TTFT", name=req.kind, response_time=(first - start) * 1000,
                                response_length=0, exception=None, context={})
