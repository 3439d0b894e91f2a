"""Config: defaults, YAML, flags and their validation, built once."""

import pytest

from vlmserve.config import DEFAULT_MM_LIMITS, build_config, parse_mm_limits


def test_media_counts_are_bounded_by_default_and_a_flag_overrides_one_modality():
    assert build_config().server.limit_mm_per_prompt == DEFAULT_MM_LIMITS
    assert build_config(limit_mm_per_prompt="image=100").server.limit_mm_per_prompt == {
        "image": 100, "video": DEFAULT_MM_LIMITS["video"]}


@pytest.mark.parametrize("spec,error", [("image", "modality=N"), ("audio=1", "unknown modality"),
                                        ("image=x", "not an integer"), ("image=-1", ">= 0")])
def test_bad_mm_limits_are_refused_with_the_expected_form(spec, error):
    with pytest.raises(ValueError, match=error):
        parse_mm_limits(spec)


def test_yaml_configs_of_every_model_build(tmp_path):
    from pathlib import Path

    for path in sorted(Path("model_configs").glob("*.yaml")):
        cfg = build_config(path)
        assert cfg.engine.max_num_seqs >= 1, path


def test_unknown_config_keys_are_refused(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("max_num_seqz: 3\n")
    with pytest.raises(ValueError, match="max_num_seqz"):
        build_config(bad)
