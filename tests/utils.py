"""Helpers for tests that run the real engine: offline LLMs, deterministic images, chats."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def make_llm(model_dir: Path, **overrides):
    from vlmserve.config import EngineConfig
    from vlmserve.engine.llm import LLM

    base = dict(model=str(model_dir), num_kv_blocks=512, block_size=16, max_model_len=2048, kernel_backend="torch")
    base.update(overrides)
    return LLM(EngineConfig(**base))


def image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth-ish content (not pure noise), so resizing is exercised meaningfully.
    base = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


def user(*parts) -> dict:
    content = [{"type": "image"} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts]
    return {"role": "user", "content": content}


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch_server(model_dir: Path, workdir: Path, *extra_args: str, env: dict | None = None, procs: list | None = None):
    """`vlmserve serve` in a subprocess on a free loopback port; yields its base URL once
    /health answers 200, and stops it afterwards. `procs`, if given, receives the Popen."""
    port = _free_port()
    log = workdir / "server.log"
    full_env = dict(os.environ, VLMSERVE_CACHE=str(workdir / "cache"), **(env or {}))
    args = [sys.executable, "-m", "vlmserve.cli", "serve", "--model", str(model_dir), "--port", str(port),
            "--served-model-name", "tiny", "--num-kv-blocks", "256", "--max-model-len", "2048", *extra_args]
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=full_env)
    if procs is not None:
        procs.append(proc)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{log.read_text()}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become healthy:\n{log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def process_exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaped (an orphan's zombie under a container init counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_process_exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not process_exited(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
