"""Tiny random-weight Molmo v1 checkpoints in the real (remote-code) on-disk layout.

`make_tiny_molmo(out_dir, seed)` writes what `allenai/Molmo-7B-D-0924` ships, at tiny sizes:
config.json (`MolmoForCausalLM`, the real keys, plus `fixture_vision_backbone` with the tiny
ViT sizes, as the golden fixtures' checkpoint), the weights under the published names (one
file, or two shards with `model.safetensors.index.json`), a Qwen2-style byte-level BPE tokenizer laid out
like the real one (BPE ids, then `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, then
`|<EXTRA_TOKENS_k>|` up to embedding_size, then `<im_start>`, `<im_end>`, `<im_patch>`,
`<im_col>`, `<|image|>` in the `new_embedding` rows), preprocessor_config.json,
processor_config.json and generation_config.json.

Weight scales follow the golden fixture's: linear weights std 1/sqrt(fan_in), norms 1 ± 0.1,
biases 0.05, embeddings 0.5, ViT class/positional and pad embeddings 0.3. The output rows of
the special tokens other than `<|endoftext|>` are zero (logit 0, far below the max), so greedy
output decodes to text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from vlmserve.models.molmo.config import ADDITIONAL_VOCAB_SIZE
from vlmserve.models.molmo.processor import IMAGE_TOKENS

_TEXT = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, embedding_size=512)
_VISION = dict(image_emb_dim=32, image_num_heads=2, image_num_key_value_heads=2, image_num_layers=9,
               image_head_dim=16, image_mlp_dim=64)
_BPE_VOCAB_SIZE = 420
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The real tokenizer_config.json's chat template (the official Molmo code path does not use it).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_WORDS = (
    "the a of to in on and is are this that it what which who how image picture photo color red green blue "
    "yellow black white circle square line cat dog car tree house sky left right top bottom small large "
    "describe show tell see look count answer question user assistant one two three yes no"
).split()


def _corpus() -> list[str]:
    rng = random.Random(20240925)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))).capitalize() + rng.choice(".?!,")
            for _ in range(2000)]


def build_tokenizer(embedding_size: int) -> tuple[Tokenizer, list[str]]:
    """(tokenizer, its special tokens in id order)."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=_BPE_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus(), trainer=trainer)
    base = tok.get_vocab_size()
    chat = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    extra = [f"|<EXTRA_TOKENS_{k}>|" for k in range(embedding_size - base - len(chat))]
    specials = chat + extra + list(IMAGE_TOKENS.values())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok, specials


def _tokenizer_config(tok: Tokenizer, specials: list[str]) -> dict[str, Any]:
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in specials}
    return {
        "add_prefix_space": False, "added_tokens_decoder": added, "additional_special_tokens": specials[3:],
        "auto_map": {"AutoProcessor": "preprocessing_molmo.MolmoProcessor"}, "bos_token": None,
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>",
        "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "processor_class": "MolmoProcessor", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _config() -> dict[str, Any]:
    t = _TEXT
    return {
        "architectures": ["MolmoForCausalLM"], "attention_layer_norm": False,
        "auto_map": {"AutoConfig": "config_molmo.MolmoConfig", "AutoModelForCausalLM": "modeling_molmo.MolmoForCausalLM"},
        "clip_qkv": None, "embedding_size": t["embedding_size"], "fixture_vision_backbone": dict(_VISION),
        "hidden_size": t["hidden"], "initializer_range": 0.02, "intermediate_size": t["intermediate"],
        "layer_norm_eps": 1e-6, "layer_norm_type": "rms", "max_position_embeddings": 4096, "model_type": "molmo",
        "norm_after": False, "num_attention_heads": t["heads"], "num_hidden_layers": t["layers"],
        "num_key_value_heads": t["kv_heads"], "qkv_bias": True, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.43.3", "use_cache": True, "use_position_ids": True,
        "vocab_size": t["embedding_size"], "weight_tying": False,
    }


def _preprocessor_config() -> dict[str, Any]:
    return {
        "auto_map": {"AutoImageProcessor": "image_preprocessing_molmo.MolmoImageProcessor",
                     "AutoProcessor": "preprocessing_molmo.MolmoProcessor"},
        "base_image_input_size": [336, 336], "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_padding_mask": True, "image_patch_size": 14,
        "image_processor_type": "MolmoImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_token_length_h": 12, "image_token_length_w": 12, "max_crops": 12, "overlap_margins": [4, 4],
        "processor_class": "MolmoProcessor",
    }


def _weights(seed: int, eos_id: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def linear(out: int, inp: int) -> torch.Tensor:
        return normal(out, inp, std=inp**-0.5)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + normal(n, std=0.1)

    t, v = _TEXT, _VISION
    h, e = t["hidden"], v["image_emb_dim"]
    head_dim = h // t["heads"]
    qkv = h + 2 * t["kv_heads"] * head_dim
    w: dict[str, torch.Tensor] = {}
    p = "model.transformer."
    w[p + "wte.embedding"] = normal(t["embedding_size"], h, std=0.5)
    w[p + "wte.new_embedding"] = normal(ADDITIONAL_VOCAB_SIZE, h, std=0.5)
    for i in range(t["layers"]):
        b = f"{p}blocks.{i}."
        w[b + "att_proj.weight"] = linear(qkv, h)
        w[b + "att_proj.bias"] = normal(qkv, std=0.05)
        w[b + "attn_out.weight"] = linear(h, h)
        w[b + "attn_norm.weight"] = norm(h)
        w[b + "ff_norm.weight"] = norm(h)
        w[b + "ff_proj.weight"] = linear(t["intermediate"], h)  # value half, then gate half
        w[b + "ff_out.weight"] = linear(h, t["intermediate"] // 2)
    w[p + "ln_f.weight"] = norm(h)
    lm_head = linear(t["embedding_size"], h)
    lm_head[_BPE_VOCAB_SIZE:] = 0.0  # special tokens never win greedy decoding ...
    lm_head[eos_id] = linear(1, h)[0]  # ... but the end of text can
    w[p + "ff_out.weight"] = lm_head

    vb = "model.vision_backbone."
    feat = 2 * e  # two ViT layers concatenated
    n_pos = 1 + (336 // 14) ** 2
    w[vb + "image_vit.class_embedding"] = normal(e, std=0.3)
    w[vb + "image_vit.positional_embedding"] = normal(n_pos, e, std=0.3)
    w[vb + "image_vit.patch_embedding.weight"] = linear(e, 14 * 14 * 3)
    w[vb + "image_vit.pre_ln.weight"] = norm(e)
    w[vb + "image_vit.pre_ln.bias"] = normal(e, std=0.05)
    for i in range(v["image_num_layers"]):
        b = f"{vb}image_vit.transformer.resblocks.{i}."
        for proj in ("wq", "wk", "wv", "wo"):
            w[b + f"attention.{proj}.weight"] = linear(e, e)
            w[b + f"attention.{proj}.bias"] = normal(e, std=0.05)
        for n in ("attention_norm", "ffn_norm"):
            w[b + f"{n}.weight"] = norm(e)
            w[b + f"{n}.bias"] = normal(e, std=0.05)
        w[b + "feed_forward.w1.weight"] = linear(v["image_mlp_dim"], e)
        w[b + "feed_forward.w1.bias"] = normal(v["image_mlp_dim"], std=0.05)
        w[b + "feed_forward.w2.weight"] = linear(e, v["image_mlp_dim"])
        w[b + "feed_forward.w2.bias"] = normal(e, std=0.05)
    for proj in ("wq", "wk", "wv"):
        w[vb + f"image_pooling_2d.{proj}.weight"] = linear(e, feat)
        w[vb + f"image_pooling_2d.{proj}.bias"] = normal(e, std=0.05)
    w[vb + "image_pooling_2d.wo.weight"] = linear(e, e)
    w[vb + "image_pooling_2d.wo.bias"] = normal(e, std=0.05)
    half = t["intermediate"] // 2
    w[vb + "image_projector.w1.weight"] = linear(half, e)
    w[vb + "image_projector.w2.weight"] = linear(h, half)
    w[vb + "image_projector.w3.weight"] = linear(half, e)
    w[vb + "pad_embed"] = normal(2, feat, std=0.3)
    return w


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_molmo(out_dir: str | Path, seed: int = 0, sharded: bool = False) -> Path:
    """Write the tiny checkpoint into `out_dir` (created if missing) and return its path: one
    model.safetensors, as the golden fixture's, or (`sharded`) two shards and an index, as the
    published checkpoints."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok, specials = build_tokenizer(_TEXT["embedding_size"])
    tok.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(tok, specials))
    _write_json(out / "special_tokens_map.json", {"additional_special_tokens": specials[3:], "eos_token": "<|endoftext|>",
                                                  "pad_token": "<|endoftext|>"})
    _write_json(out / "config.json", _config())
    _write_json(out / "generation_config.json", {"_from_model_config": True, "transformers_version": "4.43.3"})
    _write_json(out / "preprocessor_config.json", _preprocessor_config())
    _write_json(out / "processor_config.json", {"auto_map": {"AutoProcessor": "preprocessing_molmo.MolmoProcessor"},
                                                "processor_class": "MolmoProcessor"})
    weights = _weights(seed, tok.token_to_id("<|endoftext|>"))
    if not sharded:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    # The decoder, then the vision backbone.
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in weights.items() if "vision_backbone" not in k},
              "model-00002-of-00002.safetensors": {k: v for k, v in weights.items() if "vision_backbone" in k}}
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return out
