"""The check's sections other than throughput. Each takes the run's `Context` and returns a
JSON-able dict of findings with `ok` (True, False, or None for "not applicable"); raising
counts as a failed section."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import vlmserve
from vlmserve.config import EngineConfig
from vlmserve.engine.llm import LLM
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.models.registry import TINY_MAKERS, make_tiny_model


def _checkout() -> Path | None:
    """The repo root holding tests/kernels: the editable install's, else the working directory
    (a regular install run from a checkout, as scripts/gpu_check_on_device.sh does)."""
    for root in (Path(vlmserve.__file__).resolve().parents[1], Path.cwd()):
        if (root / "tests" / "kernels").is_dir():
            return root
    return None


@dataclass(frozen=True)
class Context:
    out: Path
    dry: bool  # toy sizes on the CPU, Triton interpreted
    device: str  # "cuda", or "cpu" when dry

    def path(self, *parts: str) -> Path:
        p = self.out.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def env(ctx: Context) -> dict[str, Any]:
    import triton

    info: dict[str, Any] = {"ok": True, "torch": torch.__version__, "triton": triton.__version__,
                            "cuda_available": torch.cuda.is_available(), "dry": ctx.dry,
                            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, memory_total_gib=total / 2**30,
                    memory_free_gib=free / 2**30, cuda=torch.version.cuda)
    elif not ctx.dry:
        info.update(ok=False, error="no CUDA device: run with --dry on a CPU machine")
    return info


def kernels(ctx: Context) -> dict[str, Any]:
    """Runs tests/kernels under pytest on the device (the tests pick CUDA when it exists)."""
    root = _checkout()
    if root is None:
        return {"ok": None, "skipped": "no tests/kernels here: the kernel tests ship with a checkout, not the wheel"}
    tests = root / "tests" / "kernels"
    junit = ctx.path("kernels.xml")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), f"--junitxml={junit}"]
    if ctx.dry:
        args += ["-k", "rms_norm and float32"]  # enough to prove the harness; the rest is CI's
    run = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=420)
    ctx.path("kernels.log").write_text(run.stdout + run.stderr)
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"ok": run.returncode == 0 and counts["tests"] > 0, **counts, "failed": failed[:50],
            "summary": (run.stdout.strip().splitlines() or [""])[-1]}


def _prompts(llm: LLM, seed: int) -> list:
    """Two requests: one image (a size every family's tiny processor takes) and text only."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe it"}]}]
    text_only = [{"role": "user", "content": [{"type": "text", "text": "count to ten"}]}]
    return [llm.render_chat(with_image, [image]), llm.render_chat(text_only, [])]


def _greedy(ckpt: Path, device: str, backend: str) -> list[list[int]]:
    llm = LLM(EngineConfig(model=str(ckpt), device=device, kernel_backend=backend, dtype="float32",
                           kv_cache_memory_gb=0.25))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    return [c.token_ids for c in llm.generate(_prompts(llm, 0), params)]


def parity(ctx: Context) -> dict[str, Any]:
    """Triton on the device against the CPU reference backend, per family, greedy tokens exact."""
    results: dict[str, Any] = {}
    for family in ["qwen2_vl"] if ctx.dry else sorted(TINY_MAKERS):  # dry: one family proves the path
        try:
            ckpt = make_tiny_model(family, ctx.path("ckpt", family, ".keep").parent, seed=0)
            reference = _greedy(ckpt, "cpu", "torch")
            ours = _greedy(ckpt, ctx.device, "triton")
            results[family] = {"ok": ours == reference, "reference": reference, "triton": ours}
        except Exception as e:  # one family's failure must not hide the others'
            results[family] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": all(r["ok"] for r in results.values()), "families": results}


def graphs(ctx: Context) -> dict[str, Any]:
    try:
        from vlmserve.runner import cuda_graphs  # noqa: F401
    except ImportError:
        return {"ok": None, "skipped": "CUDA graphs are not implemented yet (issue 15, item 3)"}
    return {"ok": None, "skipped": "graph comparison not wired into the check yet"}
