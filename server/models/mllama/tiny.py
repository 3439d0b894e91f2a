"""A tiny random-weight Llama 3.2 Vision checkpoint in the published Hugging Face layout.

`make_tiny_mllama(out_dir, seed)` writes what meta-llama/Llama-3.2-11B-Vision-Instruct ships
(nested config.json, generation_config.json, preprocessor_config.json, tokenizer.json with
Llama 3's special tokens and BOS post-processor, tokenizer_config.json + chat_template.json
with the real chat template, model.safetensors under the published names
`language_model.model.*`, `language_model.lm_head.*`, `vision_model.*`,
`multi_modal_projector.*`) at tiny sizes: 56-px tiles of 14-px patches (17 tokens per tile),
at most 4 tiles; text hidden 64 with cross-attention layers 1 and 3 of 5.

Invariants: the tokenizer depends only on this file (every seed gives the same ids); the
same seed gives byte-identical files; the text vocabulary is the BPE + Llama 3's first
special tokens, `<|image|>` is the id right after it (= vocab_size, inside the vocab + 8
embedding rows, outside lm_head), as in the real checkpoint. Weight scales: gates are
tanh-significant (images change the answer) and logits spread a few units (clear argmaxes).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vlmserve.models.mllama.chat_template import LLAMA_3_2_VISION_CHAT_TEMPLATE
from vlmserve.models.tiny_options import check_tiny_options, padded_vocab_size

# Llama 3's first special tokens, in their published order (ids follow the BPE vocabulary).
SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
)
IMAGE_TOKEN = "<|image|>"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_BPE_VOCAB_SIZE = 600
_TEXT = dict(hidden=64, layers=5, cross=[1, 3], heads=4, kv_heads=2, intermediate=128)
_VISION = dict(hidden=32, heads=2, intermediate=64, layers=3, global_layers=2, inter=[0, 2], tile=56, patch=14, tiles=4)
_WORDS = (
    "the a of to in on is are this that it what which who how why where image picture photo color red green blue "
    "cat dog bird car tree house sky sea person left right top bottom small large bright dark one two three four "
    "describe show tell see look count read answer question please thank you assistant user system hello world"
).split()


def _training_text() -> list[str]:
    rng = random.Random(3202)
    return [
        " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))).capitalize() + rng.choice(".?!,:")
        + (f" {rng.randint(0, 999)}" if i % 5 == 0 else "")
        for i in range(2000)
    ]


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE split like Llama 3, its special tokens, then `<|image|>`; every encoding
    starts with `<|begin_of_text|>` (the post-processor, as in the published tokenizer.json)."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, IMAGE_TOKEN)])
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return tok


def _tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t, i in ids.items()
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA_3_2_VISION_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "pad_token": "<|finetune_right_pad_id|>",
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _config(ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    t, v = _TEXT, _VISION
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "image_token_index": ids[IMAGE_TOKEN],
        "model_type": "mllama",
        "torch_dtype": "float32",
        "transformers_version": "4.45.0.dev0",
        "text_config": {
            "bos_token_id": ids["<|begin_of_text|>"],
            "cross_attention_layers": t["cross"],
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
            "hidden_act": "silu",
            "hidden_size": t["hidden"],
            "intermediate_size": t["intermediate"],
            "max_position_embeddings": 131072,
            "model_type": "mllama_text_model",
            "num_attention_heads": t["heads"],
            "num_hidden_layers": t["layers"],
            "num_key_value_heads": t["kv_heads"],
            "pad_token_id": ids["<|finetune_right_pad_id|>"],
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3",
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "float32",
            "vocab_size": vocab_size,
        },
        "vision_config": {
            "attention_heads": v["heads"],
            "hidden_act": "gelu",
            "hidden_size": v["hidden"],
            "image_size": v["tile"],
            "intermediate_layers_indices": v["inter"],
            "intermediate_size": v["intermediate"],
            "max_num_tiles": v["tiles"],
            "model_type": "mllama_vision_model",
            "norm_eps": 1e-05,
            "num_channels": 3,
            "num_global_layers": v["global_layers"],
            "num_hidden_layers": v["layers"],
            "patch_size": v["patch"],
            "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]],
            "vision_output_dim": v["hidden"] * (1 + len(v["inter"])),
        },
    }


def _weights(num_embeddings: int, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std + mean

    t, v = _TEXT, _VISION
    h, d = t["hidden"], t["hidden"] // t["heads"]
    kv, inter = t["kv_heads"] * d, t["intermediate"]
    w: dict[str, torch.Tensor] = {"language_model.model.embed_tokens.weight": normal(num_embeddings, h, std=0.5)}
    for i in range(t["layers"]):
        p = f"language_model.model.layers.{i}."
        attn = "cross_attn." if i in t["cross"] else "self_attn."
        for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            w[p + attn + name + ".weight"] = normal(rows, h, std=0.15)
        if i in t["cross"]:
            w[p + "cross_attn.q_norm.weight"] = normal(d, std=0.05, mean=1.0)
            w[p + "cross_attn.k_norm.weight"] = normal(d, std=0.05, mean=1.0)
            w[p + "cross_attn_attn_gate"] = normal(1, std=0.1, mean=0.8)
            w[p + "cross_attn_mlp_gate"] = normal(1, std=0.1, mean=0.6)
        w[p + "mlp.gate_proj.weight"] = normal(inter, h, std=0.15)
        w[p + "mlp.up_proj.weight"] = normal(inter, h, std=0.15)
        w[p + "mlp.down_proj.weight"] = normal(h, inter, std=0.1)
        w[p + "input_layernorm.weight"] = normal(h, std=0.05, mean=1.0)
        w[p + "post_attention_layernorm.weight"] = normal(h, std=0.05, mean=1.0)
    w["language_model.model.norm.weight"] = normal(h, std=0.05, mean=1.0)
    w["language_model.lm_head.weight"] = normal(vocab_size, h, std=0.4)

    e, tiles, patches = v["hidden"], v["tiles"], (v["tile"] // v["patch"]) ** 2 + 1
    ids = 9  # 8 aspect ratios + "none"
    w["vision_model.patch_embedding.weight"] = normal(e, 3, v["patch"], v["patch"], std=0.05)
    w["vision_model.class_embedding"] = normal(e, std=0.5)
    w["vision_model.gated_positional_embedding.embedding"] = normal(patches, e, std=0.5)
    w["vision_model.gated_positional_embedding.gate"] = normal(1, std=0.1, mean=0.5)
    w["vision_model.gated_positional_embedding.tile_embedding.weight"] = normal(ids, tiles * patches * e, std=0.5)
    for which in ("pre", "post"):
        w[f"vision_model.{which}_tile_positional_embedding.embedding.weight"] = normal(ids, tiles * e, std=0.5)
        w[f"vision_model.{which}_tile_positional_embedding.gate"] = normal(1, std=0.1, mean=0.5)
    for n in ("layernorm_pre", "layernorm_post"):
        w[f"vision_model.{n}.weight"] = normal(e, std=0.05, mean=1.0)
        w[f"vision_model.{n}.bias"] = normal(e, std=0.02)
    for stack, count in (("transformer", v["layers"]), ("global_transformer", v["global_layers"])):
        for i in range(count):
            p = f"vision_model.{stack}.layers.{i}."
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w[p + f"self_attn.{name}.weight"] = normal(e, e, std=0.2)
            w[p + "mlp.fc1.weight"] = normal(v["intermediate"], e, std=0.15)
            w[p + "mlp.fc1.bias"] = normal(v["intermediate"], std=0.02)
            w[p + "mlp.fc2.weight"] = normal(e, v["intermediate"], std=0.15)
            w[p + "mlp.fc2.bias"] = normal(e, std=0.02)
            for n in ("input_layernorm", "post_attention_layernorm"):
                w[p + f"{n}.weight"] = normal(e, std=0.05, mean=1.0)
                w[p + f"{n}.bias"] = normal(e, std=0.02)
            if stack == "global_transformer":
                w[p + "gate_attn"] = normal(1, std=0.1, mean=0.7)
                w[p + "gate_ffn"] = normal(1, std=0.1, mean=0.7)
    out_dim = e * (1 + len(v["inter"]))
    w["multi_modal_projector.weight"] = normal(h, out_dim, std=0.15)
    w["multi_modal_projector.bias"] = normal(h, std=0.02)
    return w


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _generation_config(ids: dict[str, int], which: str) -> dict[str, Any]:
    """"published": meta-llama/Llama-3.2-11B-Vision-Instruct's sampling defaults, temperature
    0.6 and top_p 0.9, as its Llama 3.1/3.2 instruct siblings publish them (e.g. the
    byte-for-byte copy of Llama-3.1-8B-Instruct's file, unsloth/Meta-Llama-3.1-8B-Instruct:
    do_sample true, temperature 0.6, top_p 0.9; the gated meta-llama file was not readable from
    here, so this is the family's value rather than a byte copy). "greedy": the token ids only."""
    ids_only = {
        "bos_token_id": ids["<|begin_of_text|>"],
        "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
        "pad_token_id": ids["<|finetune_right_pad_id|>"],
        "transformers_version": "4.45.0.dev0",
    }
    if which == "greedy":
        return ids_only
    return {**ids_only, "do_sample": True, "temperature": 0.6, "top_p": 0.9}


def make_tiny_mllama(
    out_dir: str | Path, seed: int = 0, vocab_size: int | None = None, generation_config: str = "published"
) -> Path:
    """Write the tiny checkpoint into `out_dir` (created if missing) and return its path.

    `vocab_size`: LM-head rows (default: the text vocabulary, so `<|image|>` is the id right
    after it, as published; 128256 is the real size). When larger, `<|image|>` keeps its
    tokenizer id inside the rows and its LM-head row, like every padding row past the
    tokenizer, is 0, so greedy decoding never emits it."""
    check_tiny_options(generation_config)
    tok = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in (*SPECIAL_TOKENS, IMAGE_TOKEN)}
    # The text vocabulary ends right before <|image|>.
    num_text_tokens = ids[IMAGE_TOKEN]
    vocab_size = padded_vocab_size(num_text_tokens, vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(ids))
    _write_json(out / "chat_template.json", {"chat_template": LLAMA_3_2_VISION_CHAT_TEMPLATE})
    _write_json(out / "special_tokens_map.json", {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>",
    })
    _write_json(out / "config.json", _config(ids, vocab_size))
    _write_json(out / "generation_config.json", _generation_config(ids, generation_config))
    _write_json(out / "preprocessor_config.json", {
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "MllamaImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "max_image_tiles": _VISION["tiles"],
        "processor_class": "MllamaProcessor", "resample": 2, "rescale_factor": 0.00392156862745098,
        "size": {"height": _VISION["tile"], "width": _VISION["tile"]},
    })
    weights = _weights(vocab_size + 8, vocab_size, seed)
    weights["language_model.lm_head.weight"][num_text_tokens:] = 0.0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
