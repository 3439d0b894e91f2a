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


def test_tensor_parallel_size_flag_reaches_the_engine_config(tmp_path):
    from vlmserve.cli import MEDIA_FLAGS, SERVER_FLAGS, _build_config, build_parser

    args = build_parser().parse_args(["serve", "--model", str(tmp_path), "--tensor-parallel-size", "2"])
    assert _build_config(args, SERVER_FLAGS + MEDIA_FLAGS).engine.tensor_parallel_size == 2
    args = build_parser().parse_args(["serve", "--model", str(tmp_path)])
    assert _build_config(args, SERVER_FLAGS + MEDIA_FLAGS).engine.tensor_parallel_size == 1
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1"):
        args = build_parser().parse_args(["serve", "--model", str(tmp_path), "--tensor-parallel-size", "0"])
        _build_config(args, SERVER_FLAGS + MEDIA_FLAGS)
