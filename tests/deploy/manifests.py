"""Rendering and schema helpers for the deploy tests: `kubectl kustomize` over every
kustomization under deploy/kubernetes, and JSON Schemas for the custom resources made from
the CRDs kept in ../shared/fixtures/crds (see its README for the conversion rules)."""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
CRDS = REPO / ".." / "shared" / "fixtures" / "crds"

OVERLAYS = ["qwen2-vl-7b", "llama-3.2-11b-vision", "pixtral-12b", "molmo-7b-d", "nvlm-d-72b", "llama-3.2-90b-vision"]
# Every kustomization a user applies (components are rendered through the autoscaled ones).
RENDERABLE = (
    ["base"]
    + [f"overlays/{o}" for o in OVERLAYS]
    + ["autoscaled/qwen2-vl-7b-keda", "autoscaled/qwen2-vl-7b-hpa", "lws/llama-3.2-90b-vision"]
)
# Kinds that kubernetes-validate has no schema for: each is checked against its CRD.
CRD_FILES = {
    ("keda.sh", "ScaledObject"): "keda.sh_scaledobjects.yaml",
    ("monitoring.coreos.com", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
    ("leaderworkerset.x-k8s.io", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_leaderworkersets.yaml",
}


def kubectl() -> str:
    path = shutil.which("kubectl")
    assert path, "kubectl (with its built-in kustomize) is required: .ci/run installs it when missing"
    return path


@functools.lru_cache(maxsize=None)
def render(rel: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(KUBE / rel)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {rel} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(objs, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def pod_specs(objs) -> list[tuple[str, dict[str, Any]]]:
    """(label, pod template) of every workload: Deployments and LeaderWorkerSet roles."""
    out = []
    for d in find(objs, "Deployment"):
        out.append((f"Deployment/{d['metadata']['name']}", d["spec"]["template"]))
    for lws in find(objs, "LeaderWorkerSet"):
        tpl = lws["spec"]["leaderWorkerTemplate"]
        out.append(("LeaderWorkerSet/leader", tpl["leaderTemplate"]))
        out.append(("LeaderWorkerSet/worker", tpl["workerTemplate"]))
    return out


def _to_json_schema(node: Any) -> Any:
    """One openAPIV3Schema node → JSON Schema, as the API server's strict validation reads it."""
    if isinstance(node, list):
        return [_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    for key in ("properties", "patternProperties"):
        if key in node:
            out[key] = {name: _to_json_schema(sub) for name, sub in node[key].items()}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if isinstance(node.get("pattern"), str):
        # Go's RE2 takes inline flags anywhere (`^(?i)...`); Python's re only at the start.
        out["pattern"] = re.sub(r"^\^\((\?[a-z]+)\)", r"(\1)^", node["pattern"])
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node and not preserve:
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def crd_schema(group: str, kind: str, version: str) -> dict[str, Any]:
    # The C loader: the LeaderWorkerSet CRD is 1.3 MB (two full pod templates).
    crd = yaml.load((CRDS / CRD_FILES[(group, kind)]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v.get("served", False), f"{kind} {group}/{version} is not served by its CRD"
            schema = copy.deepcopy(v["schema"]["openAPIV3Schema"])
            return _to_json_schema(schema)
    raise AssertionError(f"{kind}: version {version} not in its CRD ({CRD_FILES[(group, kind)]})")
