"""A tiny random-weight Qwen2-VL checkpoint in the published Hugging Face on-disk layout.

`make_tiny_qwen2_vl(out_dir, seed)` writes what `Qwen/Qwen2-VL-7B-Instruct` ships (flat
`config.json` with a nested `vision_config`, `generation_config.json`,
`preprocessor_config.json`, `tokenizer.json`, `tokenizer_config.json` carrying the real chat
template, `chat_template.json`, `model.safetensors` with the published parameter names) at
tiny sizes, so the loader, processor and model run against the real formats on a CPU.

Invariants:
- The tokenizer depends on nothing but this file (its training text is generated from a
  fixed word list), so every seed gives the same tokenizer and token ids; `seed` only changes
  the weights.
- The same seed gives byte-identical files.
- Weight scales are chosen so that a random model is not degenerate under greedy decoding:
  attention dominates the residual stream (so the next token depends on the whole prompt,
  not only on its last token, which the chat template fixes to "assistant\\n"), and the
  logits have a spread of a few units (no near-ties).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vlmserve.models.tiny_options import check_tiny_options, padded_vocab_size

# The chat template of Qwen/Qwen2-VL-7B-Instruct (tokenizer_config.json / chat_template.json).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# In the published order: they take consecutive ids right after the BPE vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenizer split (contractions, letter runs, single digits, punctuation, spaces).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BPE_VOCAB_SIZE = 800  # 256 byte symbols + merges

# Tiny sizes (see the brief): head_dim 32, so mrope_section sums to 16.
_TEXT = dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, mrope_section=[4, 6, 6])
_VISION = dict(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, patch=14, temporal_patch=2, merge=2)

_WORDS = (
    "the a an of to in on at for with from by and or but not is are was were be been this that "
    "these those it its he she they we you i me my your our their there here what which who how "
    "why when where image picture photo video frame color red green blue yellow black white gray "
    "cat dog bird car tree house street sky sea mountain river person people man woman child hand "
    "left right top bottom middle small large big little old new bright dark light shadow window "
    "door table chair book cup water food text number one two three four five six seven eight "
    "nine ten hello world describe show tell see look find count read answer question please "
    "thank assistant user system model server request token prompt write say can could would "
    "should will shall may might must do does did have has had make made get got go went come "
    "came take took give gave think thought know knew yes no maybe very more most less least "
    "about above below between under over into through during before after again once"
).split()


def _training_text() -> list[str]:
    """A deterministic English-like corpus: sentences from a fixed word list and fixed RNG."""
    rng = random.Random(20240829)
    lines = []
    for i in range(3000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        sentence = " ".join(words).capitalize()
        if i % 7 == 0:
            sentence += f" {rng.randint(0, 2025)}"
        lines.append(sentence + rng.choice([".", "?", "!", ",", ":"]) + (" 's it's" if i % 11 == 0 else ""))
    return lines


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE pre-tokenized like Qwen2, then the Qwen2-VL special tokens appended."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    added = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "padding_side": "left",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _config(ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    t, v = _TEXT, _VISION
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": t["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": t["intermediate"],
        "max_position_embeddings": 32768,
        "max_window_layers": t["layers"],
        "model_type": "qwen2_vl",
        "num_attention_heads": t["heads"],
        "num_hidden_layers": t["layers"],
        "num_key_value_heads": t["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": v["depth"],
            "embed_dim": v["embed_dim"],
            "mlp_ratio": v["mlp_ratio"],
            "num_heads": v["num_heads"],
            "in_chans": 3,
            "hidden_size": t["hidden"],
            "patch_size": v["patch"],
            "spatial_merge_size": v["merge"],
            "spatial_patch_size": v["patch"],
            "temporal_patch_size": v["temporal_patch"],
        },
        "rope_scaling": {"type": "mrope", "mrope_section": list(t["mrope_section"])},
        "vocab_size": vocab_size,
    }


def _generation_config(ids: dict[str, int], which: str) -> dict[str, Any]:
    """"published": the sampling defaults Qwen/Qwen2-VL-7B-Instruct ships (temperature 0.1,
    top_p 0.001, top_k 1, repetition_penalty 1.05; the same values as the copy of the Qwen2-VL
    release at huggingface.co/unsloth/Qwen2-VL-2B/blob/8963fb5/generation_config.json).
    "greedy": the eos/bos ids only (transformers then decodes greedily)."""
    ids_only = {
        "bos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "transformers_version": "4.37.0",
    }
    if which == "greedy":
        return ids_only
    return {**ids_only, "do_sample": True, "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}


def _preprocessor_config() -> dict[str, Any]:
    v = _VISION
    return {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": v["patch"],
        "temporal_patch_size": v["temporal_patch"],
        "merge_size": v["merge"],
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }


def _weights(vocab_size: int, num_tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 tensors under the published names (see the module docstring for scales)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def norm_weight(n: int) -> torch.Tensor:
        return 1.0 + normal(n, std=0.05)

    t, v = _TEXT, _VISION
    h, head_dim = t["hidden"], t["hidden"] // t["heads"]
    kv = t["kv_heads"] * head_dim
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab_size, h, std=0.02)}
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(h, h, std=0.1)
        w[p + "self_attn.q_proj.bias"] = normal(h, std=0.05)
        w[p + "self_attn.k_proj.weight"] = normal(kv, h, std=0.1)
        w[p + "self_attn.k_proj.bias"] = normal(kv, std=0.05)
        w[p + "self_attn.v_proj.weight"] = normal(kv, h, std=0.1)
        w[p + "self_attn.v_proj.bias"] = normal(kv, std=0.05)
        w[p + "self_attn.o_proj.weight"] = normal(h, h, std=0.1)
        w[p + "mlp.gate_proj.weight"] = normal(t["intermediate"], h, std=0.1)
        w[p + "mlp.up_proj.weight"] = normal(t["intermediate"], h, std=0.1)
        w[p + "mlp.down_proj.weight"] = normal(h, t["intermediate"], std=0.05)
        w[p + "input_layernorm.weight"] = norm_weight(h)
        w[p + "post_attention_layernorm.weight"] = norm_weight(h)
    w["model.norm.weight"] = norm_weight(h)
    # Final hidden has unit RMS; std 0.3 over 128 dims gives logits of std ~3.4.
    w["lm_head.weight"] = normal(vocab_size, h, std=0.3)
    # Rows past the tokenizer (vocab padded to a multiple of 64) give logit 0, far below the
    # max of ~800 logits of std ~3.4, so greedy decoding only emits ids the tokenizer decodes.
    w["lm_head.weight"][num_tokens:] = 0.0

    e, mlp = v["embed_dim"], v["embed_dim"] * v["mlp_ratio"]
    merged = e * v["merge"] ** 2
    w["visual.patch_embed.proj.weight"] = normal(e, 3, v["temporal_patch"], v["patch"], v["patch"], std=0.02)
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}."
        for n in ("norm1", "norm2"):
            w[p + n + ".weight"] = norm_weight(e)
            w[p + n + ".bias"] = normal(e, std=0.02)
        w[p + "attn.qkv.weight"] = normal(3 * e, e, std=0.1)
        w[p + "attn.qkv.bias"] = normal(3 * e, std=0.02)
        w[p + "attn.proj.weight"] = normal(e, e, std=0.1)
        w[p + "attn.proj.bias"] = normal(e, std=0.02)
        w[p + "mlp.fc1.weight"] = normal(mlp, e, std=0.1)
        w[p + "mlp.fc1.bias"] = normal(mlp, std=0.02)
        w[p + "mlp.fc2.weight"] = normal(e, mlp, std=0.1)
        w[p + "mlp.fc2.bias"] = normal(e, std=0.02)
    w["visual.merger.ln_q.weight"] = norm_weight(e)
    w["visual.merger.ln_q.bias"] = normal(e, std=0.02)
    w["visual.merger.mlp.0.weight"] = normal(merged, merged, std=0.06)
    w["visual.merger.mlp.0.bias"] = normal(merged, std=0.02)
    w["visual.merger.mlp.2.weight"] = normal(h, merged, std=0.06)
    w["visual.merger.mlp.2.bias"] = normal(h, std=0.02)
    return w


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_qwen2_vl(
    out_dir: str | Path, seed: int = 0, vocab_size: int | None = None, generation_config: str = "published"
) -> Path:
    """Write the tiny checkpoint into `out_dir` (created if missing) and return its path.

    `vocab_size`: rows of the embedding and LM head (default: the tokenizer rounded up to 64;
    151936 is the real size). The tokenizer and its special-token ids stay as they are; rows
    past the tokenizer are padding, as in the published checkpoint (151,657 tokens, 151,936
    rows). `generation_config`: "published" or "greedy" (see `_generation_config`)."""
    check_tiny_options(generation_config)
    tok = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    num_tokens = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = padded_vocab_size(num_tokens, vocab_size, 64)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(ids))
    _write_json(out / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})
    _write_json(out / "config.json", _config(ids, vocab_size))
    _write_json(out / "generation_config.json", _generation_config(ids, generation_config))
    _write_json(out / "preprocessor_config.json", _preprocessor_config())
    save_file(_weights(vocab_size, num_tokens, seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
