"""The Kubernetes manifests: every kustomization renders, every object validates (core kinds
with kubernetes-validate, custom resources against their CRDs), and the serving invariants
hold: probes, grace period vs drain, /dev/shm, GPUs, non-root, autoscaler vs replicas."""

from __future__ import annotations

import copy
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.manifests import CRD_FILES, KUBE, REPO, OVERLAYS, RENDERABLE, crd_schema, find, pod_specs, render

K8S_VERSION = "1.32.0"  # the kubectl on our base image; the manifests use nothing newer
TP_GPUS = {"nvlm-d-72b": 4, "llama-3.2-90b-vision": 4}


def _arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _validate_custom(obj) -> None:
    group, version = obj["apiVersion"].split("/")
    jsonschema.validate(obj, crd_schema(group, obj["kind"], version))


@pytest.mark.parametrize("rel", RENDERABLE)
def test_every_object_validates_against_its_schema(rel):
    objs = render(rel)
    assert objs, f"{rel} rendered nothing"
    for obj in objs:
        group = obj["apiVersion"].split("/")[0] if "/" in obj["apiVersion"] else ""
        if (group, obj["kind"]) in CRD_FILES:
            _validate_custom(obj)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_crd_validation_rejects_what_the_api_server_would():
    """The converted CRD schemas are not vacuous: unknown fields and wrong types fail."""
    so = copy.deepcopy(find(render("autoscaled/qwen2-vl-7b-keda"), "ScaledObject")[0])
    so["spec"]["minReplicas"] = 1  # HPA's spelling, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        _validate_custom(so)
    sm = copy.deepcopy(find(render("base"), "ServiceMonitor")[0])
    sm["spec"]["endpoints"][0]["interval"] = 15  # a duration string, not a number
    with pytest.raises(jsonschema.ValidationError):
        _validate_custom(sm)
    lws = copy.deepcopy(find(render("lws/llama-3.2-90b-vision"), "LeaderWorkerSet")[0])
    lws["spec"]["leaderWorkerTemplate"]["size"] = "2"
    with pytest.raises(jsonschema.ValidationError):
        _validate_custom(lws)


@pytest.mark.parametrize("rel", RENDERABLE)
def test_probes_grace_period_and_shm(rel):
    for label, tpl in pod_specs(render(rel)):
        spec = tpl["spec"]
        c = spec["containers"][0]
        role = "worker" if label.endswith("/worker") else "server"
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, label
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, label
        shm = {v["name"]: v for v in spec["volumes"]}[
            {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/dev/shm"]]
        assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"].get("sizeLimit"), label
        for key in ("cpu", "memory"):
            assert key in c["resources"]["requests"], f"{label}: no {key} request"
        if role == "worker":
            continue
        startup, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
        assert startup["httpGet"]["path"] == "/ready" and ready["httpGet"]["path"] == "/ready", label
        assert live["httpGet"]["path"] == "/health", label
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= 600, f"{label}: startup budget {budget} s < 10 min (a 72B load)"
        drain = float(_arg(c["args"], "--drain-seconds") or 0)
        longest = float(tpl["metadata"]["annotations"]["vlmserve.io/longest-request-seconds"])
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > drain + longest, f"{label}: grace {grace} s <= drain {drain} + longest request {longest}"
        # The drain must outlast the readiness probe noticing /ready at 503 (no preStop hook).
        assert drain >= ready["periodSeconds"] * ready["failureThreshold"], label
        assert "preStop" not in c.get("lifecycle", {}), label


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpu_counts_and_tensor_parallel_size(overlay):
    objs = render(f"overlays/{overlay}")
    (dep,) = find(objs, "Deployment", "vlmserve")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    gpus = TP_GPUS.get(overlay, 1)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
    tp = _arg(c["args"], "--tensor-parallel-size")
    assert (int(tp) if tp else 1) == gpus
    assert dep["metadata"]["namespace"] == f"vlmserve-{overlay}"
    assert find(objs, "Namespace", f"vlmserve-{overlay}")
    # The pod mounts the overlay's model config, not the base's demo config.
    (cm,) = find(objs, "ConfigMap")
    assert cm["data"]["model.yaml"] == (KUBE / "models" / overlay / "model.yaml").read_text()
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-config"]["configMap"]["name"] == cm["metadata"]["name"]


def test_lws_gpus_match_tensor_parallel_ranks():
    (lws,) = find(render("lws/llama-3.2-90b-vision"), "LeaderWorkerSet")
    tpl = lws["spec"]["leaderWorkerTemplate"]
    total = 0
    for role in ("leaderTemplate", "workerTemplate"):
        c = tpl[role]["spec"]["containers"][0]
        total += c["resources"]["limits"]["nvidia.com/gpu"]
        assert int(_arg(c["args"], "--tensor-parallel-size")) == 8
    assert total // 2 * tpl["size"] == 8
    cms = find(render("lws/llama-3.2-90b-vision"), "ConfigMap")
    assert tpl["leaderTemplate"]["spec"]["volumes"][1]["configMap"]["name"] == cms[0]["metadata"]["name"]


@pytest.mark.parametrize("variant,kind", [("keda", "ScaledObject"), ("hpa", "HorizontalPodAutoscaler")])
def test_autoscaler_owns_the_replica_count(variant, kind):
    objs = render(f"autoscaled/qwen2-vl-7b-{variant}")
    (dep,) = find(objs, "Deployment", "vlmserve")
    assert "replicas" not in dep["spec"], "a replicas field in the Deployment would fight the autoscaler"
    (scaler,) = find(objs, kind)
    ns = dep["metadata"]["namespace"]
    assert scaler["metadata"]["namespace"] == ns
    assert scaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "vlmserve"}
    if kind == "ScaledObject":
        for trig in scaler["spec"]["triggers"]:
            assert f'namespace="{ns}"' in trig["metadata"]["query"], trig
    # The fixed-size overlay keeps its replica count; only the autoscaled ones drop it.
    assert find(render("overlays/qwen2-vl-7b"), "Deployment")[0]["spec"]["replicas"] == 1


def test_service_and_servicemonitor_select_the_server_pods():
    for rel in RENDERABLE:
        objs = render(rel)
        (svc,) = find(objs, "Service")
        (sm,) = find(objs, "ServiceMonitor")
        for _, tpl in pod_specs(objs):
            labels = tpl["metadata"]["labels"]
            if labels["app.kubernetes.io/component"] == "server":
                assert svc["spec"]["selector"].items() <= labels.items(), rel
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items(), rel
        assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]


def test_prometheus_adapter_rules_parse():
    values = yaml.safe_load((KUBE / "prometheus-adapter" / "values.yaml").read_text())
    served = set()
    for rule in values["rules"]["custom"]:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        series = rule["seriesQuery"].split("{")[0]
        served.add(re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series))
    (hpa,) = find(render("autoscaled/qwen2-vl-7b-hpa"), "HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert wanted <= served, f"the HPA asks for {wanted - served}, which no adapter rule serves"


def _prometheus_rules_in_repo() -> list[dict]:
    """PrometheusRule objects shipped anywhere under deploy/ (deploy/prometheus has them
    when its rules are packaged for the Prometheus Operator)."""
    found = []
    for path in sorted((REPO / "deploy").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule":
                found.append(doc)
    return found


def test_prometheus_rules_validate_against_their_crd():
    for rule in _prometheus_rules_in_repo():
        _validate_custom(rule)
    good = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": {"name": "x"},
            "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0", "for": "5m"}]}]}}
    _validate_custom(good)
    bad = copy.deepcopy(good)
    bad["spec"]["groups"][0]["rules"][0]["severity"] = "page"  # belongs under labels
    with pytest.raises(jsonschema.ValidationError):
        _validate_custom(bad)
