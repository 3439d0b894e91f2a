"""`make_tiny_nvlm_d` writes the real on-disk layout: the golden fixture's checkpoint (made from
the published config and index) is the yardstick for names, shapes and config keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.models.loader import load_model, read_hf_config, safetensors_files
from vlmserve.models.nvlm_d.config import NVLMDModelConfig
from vlmserve.models.nvlm_d.processor import NVLMDProcessor
from vlmserve.models.nvlm_d.tiny import NUM_DUMMY_HEADS, make_tiny_nvlm_d
from vlmserve.models.registry import family_for_config
from tests.models.nvlm_d.conftest import user_turn
from tests.utils import image, make_llm


def _shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for path in safetensors_files(ckpt):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                out[name] = tuple(f.get_slice(name).get_shape())
    return out


def _keys(d, prefix=""):
    keys = set()
    for k, v in d.items():
        keys.add(prefix + k)
        if isinstance(v, dict) and k in ("llm_config", "vision_config"):
            keys |= _keys(v, prefix + k + ".")
    return keys


def test_layout_matches_the_fixture_checkpoint(golden, tmp_path):
    tiny = make_tiny_nvlm_d(tmp_path / "tiny", seed=0)
    ref_dir = golden / "checkpoint"
    ours, ref = _shapes(tiny), _shapes(ref_dir)
    assert sorted(ours) == sorted(ref)
    vocab = read_hf_config(tiny)["llm_config"]["vocab_size"]
    for name, shape in ref.items():
        if "embed_tokens" in name or "lm_head" in name:
            assert ours[name] == (vocab, shape[1])
        else:
            assert ours[name] == shape, name  # same tiny sizes, dummy heads included
    cfg, ref_cfg = read_hf_config(tiny), read_hf_config(ref_dir)
    assert _keys(cfg) == _keys(ref_cfg)
    assert cfg["llm_config"]["model_type"] == "llama" and cfg["architectures"] == ["NVLM_D"]
    assert family_for_config(cfg).name == "nvlm_d"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"):
        assert (tiny / name).is_file()
    tok_cfg, ref_tok = (json.loads((d / "tokenizer_config.json").read_text()) for d in (tiny, ref_dir))
    assert tok_cfg["chat_template"] == ref_tok["chat_template"]
    assert {v["content"] for v in tok_cfg["added_tokens_decoder"].values()} == {
        v["content"] for v in ref_tok["added_tokens_decoder"].values()
    }


def test_dummy_heads_are_zero_and_real_heads_are_not(tmp_path):
    tiny = make_tiny_nvlm_d(tmp_path / "tiny", seed=1)
    cfg = NVLMDModelConfig.from_hf_config(read_hf_config(tiny))
    c, hd = cfg.vision.hidden_size, cfg.vision.head_dim
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        qkv = f.get_tensor("vision_model.encoder.layers.0.attn.qkv.weight")
        proj = f.get_tensor("vision_model.encoder.layers.0.attn.proj.weight")
    padded = (cfg.vision.num_attention_heads + NUM_DUMMY_HEADS) * hd
    assert qkv.shape == (3 * padded, c) and proj.shape == (c, padded)
    assert not qkv.view(3, padded, c)[:, c:].any() and not proj[:, c:].any()
    assert qkv.view(3, padded, c)[:, :c].abs().min() > 0


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path):
    single = make_tiny_nvlm_d(tmp_path / "one", seed=2, image_size=56, max_dynamic_patch=2)
    sharded = make_tiny_nvlm_d(tmp_path / "three", seed=2, image_size=56, max_dynamic_patch=2, shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (sharded / "model.safetensors").exists()
    a = load_model(single, dtype=torch.float32, progress=False)[0].state_dict()
    b = load_model(sharded, dtype=torch.float32, progress=False)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sizes_come_from_the_checkpoint(tmp_path):
    # Another tile size and tile limit: the processor and model read both from config.json.
    tiny = make_tiny_nvlm_d(tmp_path / "tiny", seed=3, image_size=84, max_dynamic_patch=3)
    hf = read_hf_config(tiny)
    proc = NVLMDProcessor(tiny, hf)
    assert proc.tokens_per_tile == (84 // 14 // 2) ** 2 == 9
    wide = image(400, 90, 4)  # aspect 4.4: the widest grid allowed is 3 x 1
    prompt = proc.render_chat([user_turn("Describe.")], [wide])
    (item,) = prompt.mm_items
    assert item.data["tiles"].shape == (4, 84, 84, 3) and item.num_embeds == 4 * 9
    assert "<tile_3><|vision_pad|>" in prompt.prompt_text and "<tile_4>" not in prompt.prompt_text
    llm = make_llm(tiny)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and all(0 <= t < hf["llm_config"]["vocab_size"] for t in out.token_ids)
    assert np.array_equal(np.flatnonzero(item.is_embed), np.flatnonzero(
        np.asarray(prompt.prompt_token_ids[item.offset : item.offset + item.length]) == proc.image_token_id))


def test_same_seed_gives_identical_files(tmp_path):
    a = make_tiny_nvlm_d(tmp_path / "a", seed=5, image_size=56)
    b = make_tiny_nvlm_d(tmp_path / "b", seed=5, image_size=56)
    for path in a.iterdir():
        assert path.read_bytes() == (b / path.name).read_bytes(), path.name


@pytest.mark.parametrize("size", [50, 42])
def test_tile_size_must_fit_patch_and_shuffle(tmp_path, size):
    with pytest.raises(ValueError, match="multiple of 28"):
        make_tiny_nvlm_d(tmp_path / "bad", image_size=size)


def test_select_layer_runs_only_the_layers_it_reads(tmp_path):
    # hidden_states[select_layer] with hidden_states[0] the embeddings: -2 skips the last layer,
    # whose checkpoint tensors are then left unread (not reported as unexpected).
    tiny = make_tiny_nvlm_d(tmp_path / "tiny", seed=6, image_size=56)
    cfg = json.loads((tiny / "config.json").read_text())
    layers = cfg["vision_config"]["num_hidden_layers"]
    for select, used in ((-1, layers), (-2, layers - 1), (1, 1)):
        cfg["select_layer"] = select
        (tiny / "config.json").write_text(json.dumps(cfg))
        model = load_model(tiny, dtype=torch.float32, progress=False)[0]
        assert len(model.vision.vision_model.encoder.layers) == used
    cfg["select_layer"] = layers + 1
    (tiny / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="select_layer"):
        load_model(tiny, dtype=torch.float32, progress=False)
