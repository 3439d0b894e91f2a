"""Helpers for the loopback end-to-end tests of this folder: the real server, up and ready."""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import httpx

from tests.utils import launch_server


def wait_ready(base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(base + "/ready", timeout=2).status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.05)


@contextlib.contextmanager
def ready_server(model_dir: Path, workdir: Path, *args: str, procs: list | None = None):
    with launch_server(model_dir, workdir, *args, procs=procs) as base:
        wait_ready(base)
        yield base


def engine_pid(workdir: Path) -> int:
    match = re.search(r"engine core: process, pid (\d+)", (workdir / "server.log").read_text())
    assert match, "the server did not log its engine process"
    return int(match.group(1))


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (comments dropped)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
