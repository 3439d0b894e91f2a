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


# The published generation_config.json sampling defaults per family (see each tiny.py).
PUBLISHED = {
    "qwen2_vl": {"repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1},
    "mllama": {"temperature": 0.6, "top_p": 0.9},
    "pixtral": {"temperature": 0.0},  # mistral-community/pixtral-12b ships ids only: greedy
    "molmo": {"temperature": 0.0},  # Molmo-7B-D-0924's generation_config.json has no sampling keys: greedy
    "nvlm_d": {"temperature": 0.0},  # NVLM-D-72B publishes no generation_config.json: greedy
}
# The embedding and LM-head tensors, where a family does not use the HF names.
ROW_TENSORS = {"molmo": ("transformer.wte.embedding", "transformer.ff_out.weight")}


@pytest.mark.parametrize("family", sorted(TINY_MAKERS))
def test_vocab_size_grows_the_embedding_and_lm_head_and_keeps_the_tokenizer(family, tmp_path):
    from safetensors import safe_open

    from vlmserve.engine.builder import build_frontend
    from vlmserve.config import EngineConfig

    small, big = tmp_path / "small", tmp_path / "big"
    main(["make-tiny-model", "--family", family, "--out", str(small)])
    main(["make-tiny-model", "--family", family, "--out", str(big), "--vocab-size", "5000",
          "--generation-config", "published"])
    procs = [build_frontend(EngineConfig(model=str(d)), d).processor for d in (small, big)]
    # Molmo's image tokens are 128 rows of their own after the embedding (`new_embedding`).
    assert procs[1].vocab_size == 5000 + (128 if family == "molmo" else 0)
    conversation = [{"role": "user", "content": [{"type": "text", "text": "describe the red car please"}]}]
    prompts = [p.render_chat(conversation, []) for p in procs]
    assert prompts[0].prompt_token_ids == prompts[1].prompt_token_ids  # same tokenizer, same special ids
    assert procs[1].eos_token_ids == procs[0].eos_token_ids
    assert procs[1].generation_defaults() == PUBLISHED[family]
    with safe_open(str(big / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    names = ROW_TENSORS.get(family, ("embed_tokens.weight", "lm_head.weight"))
    rows = {k: s[0] for k, s in shapes.items() if k.endswith(names)}
    extra = 8 if family == "mllama" else 0  # Mllama's embedding has 8 rows past the LM head
    assert sorted(rows.values()) == [5000, 5000 + extra]
    with safe_open(str(big / "model.safetensors"), "pt") as f:
        head = f.get_tensor(next(k for k in rows if k.endswith(names[1])))
    num_tokens = len(procs[1].tokenizer)
    assert head[:num_tokens].abs().sum() > 0 and head[num_tokens:].abs().sum() == 0  # padding never wins


@pytest.mark.parametrize("family", ["qwen2_vl", "mllama"])
def test_generation_config_greedy_writes_no_sampling_defaults(family, tmp_path):
    out = tmp_path / family
    main(["make-tiny-model", "--family", family, "--out", str(out), "--generation-config", "greedy"])
    gen = json.loads((out / "generation_config.json").read_text())
    assert "eos_token_id" in gen and not {"do_sample", "temperature", "top_p", "top_k"} & set(gen)


def test_vocab_size_below_the_tokenizer_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["make-tiny-model", "--family", "qwen2_vl", "--out", str(tmp_path / "q"), "--vocab-size", "100"])
    assert "--vocab-size 100 is smaller than the tiny tokenizer" in capsys.readouterr().err
