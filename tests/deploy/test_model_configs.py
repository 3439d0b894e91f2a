"""The ConfigMaps' model YAMLs (deploy/kubernetes/models/*/model.yaml) are model_configs/
verbatim, and load with the server's own config builder."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import KUBE, OVERLAYS, REPO

SOURCES = {
    "qwen2-vl-7b": "qwen2-vl-7b-instruct.yaml",
    "llama-3.2-11b-vision": "llama-3.2-11b-vision-instruct.yaml",
    "pixtral-12b": "pixtral-12b.yaml",
    "molmo-7b-d": "molmo-7b-d-0924.yaml",
    "nvlm-d-72b": "nvlm-d-72b.yaml",
    "llama-3.2-90b-vision": "llama-3.2-90b-vision-instruct.yaml",
}


def test_every_overlay_has_a_model_component():
    assert sorted(SOURCES) == sorted(OVERLAYS)
    assert sorted(p.name for p in (KUBE / "models").iterdir()) == sorted(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployed_config_is_model_configs_verbatim(overlay):
    from vlmserve.config import build_config

    deployed = KUBE / "models" / overlay / "model.yaml"
    source = REPO / "model_configs" / SOURCES[overlay]
    assert deployed.read_text() == source.read_text(), f"copy {source} to {deployed}"
    cfg = build_config(deployed)
    assert cfg.engine.model and cfg.engine.dtype == "bfloat16"
    assert cfg.server.host == "127.0.0.1"  # the image's entrypoint sets --host 0.0.0.0, not the YAML


def test_base_serves_the_tiny_demo_config():
    assert (KUBE / "base" / "model.yaml").read_text() == (REPO / "model_configs" / "tiny-qwen2-vl-demo.yaml").read_text()
