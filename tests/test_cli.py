"""`vlmserve make-tiny-model` for every family writes a checkpoint the registry can serve."""

import json

import pytest

from vlmserve.cli import main
from vlmserve.models.registry import TINY_MAKERS, family_for_config


@pytest.mark.parametrize("family", sorted(TINY_MAKERS))
def test_make_tiny_model_for_every_family(family, tmp_path, capsys):
    out = tmp_path / family
    main(["make-tiny-model", "--family", family, "--out", str(out), "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert family_for_config(config).name == family
    assert (out / "model.safetensors").stat().st_size > 0
