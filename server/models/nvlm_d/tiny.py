"""A tiny random-weight NVLM-D checkpoint in the published on-disk layout of nvidia/NVLM-D-72B.

`make_tiny_nvlm_d(out_dir, seed)` writes what the hub repo ships, at tiny sizes: `config.json`
with every key of the real one (`architectures ["NVLM_D"]`, `auto_map`, the tiling keys, an
InternViT `vision_config`, a Qwen2 `llm_config` that keeps the real `"model_type": "llama"`),
`preprocessor_config.json`, a Qwen2-style byte-level BPE tokenizer with the 22 Qwen2.5 added
tokens (`tokenizer.json`, `tokenizer_config.json` with the real Qwen2.5 chat template, which
NVLM-D's chat() does not use, `special_tokens_map.json`), and the weights under the published
names: `model.safetensors`, as the golden fixture's checkpoint, or with `shards=n` sharded as
the hub repo is (`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`).

The vision attention is padded as in the real checkpoint: 7 zero "dummy" heads in qkv, in the
q/k norms and in proj's input columns (the loader strips them).

Invariants: the tokenizer depends on nothing but `qwen2_vl.tiny.build_tokenizer` (every seed
gives the same ids); `seed` only changes the weights; the same arguments give identical files.
Weight scales follow the golden fixture's recipe (std 1/sqrt(fan_in) for matrices, norms
1 +- 0.1, layer scales 0.5 +- 0.1, embeddings 0.5), which keeps greedy decoding of a random
model non-degenerate. Rows of the LM head past the tokenizer are zero (never argmax).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken

from vlmserve.models.qwen2_vl.tiny import SPECIAL_TOKENS, build_tokenizer

NUM_DUMMY_HEADS = 7  # hard-coded in the official InternAttention
# After the 14 Qwen2-VL specials, Qwen2.5's added tokens (not special).
EXTRA_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
_VISION = dict(hidden=32, heads=2, intermediate=128, layers=3, patch=14)
_TEXT = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)

# tokenizer_config.json's chat_template in nvidia/NVLM-D-72B (Qwen2.5's).
QWEN25_CHAT_TEMPLATE = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    '    {%- else %}\n'
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    '    {%- endif %}\n'
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    '    {%- else %}\n'
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    '        {%- if message.content %}\n'
    "            {{- '\\n' + message.content }}\n"
    '        {%- endif %}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- if tool_call.function is defined %}\n'
    '                {%- set tool_call = tool_call.function %}\n'
    '            {%- endif %}\n'
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n"
    '        {%- endfor %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)


def _tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": t in SPECIAL_TOKENS}
        for t in (*SPECIAL_TOKENS, *EXTRA_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": QWEN25_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map() -> dict[str, Any]:
    def token(t: str) -> dict[str, Any]:
        return {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "eos_token": token("<|im_end|>"),
        "pad_token": token("<|endoftext|>"),
    }


def _preprocessor_config(image_size: int) -> dict[str, Any]:
    return {
        "crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": image_size,
    }


def _llm_config(ids: dict[str, int], vocab_size: int) -> dict[str, Any]:
    t = _TEXT
    return {
        "_name_or_path": "Qwen/Qwen2-72B-Instruct", "add_cross_attention": False,
        "architectures": ["Qwen2ForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
        "bad_words_ids": None, "begin_suppress_tokens": None, "bos_token_id": ids["<|endoftext|>"],
        "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None, "decoder_start_token_id": None,
        "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
        "eos_token_id": ids["<|im_end|>"], "exponential_decay_length_penalty": None, "finetuning_task": None,
        "forced_bos_token_id": None, "forced_eos_token_id": None, "hidden_act": "silu", "hidden_size": t["hidden"],
        "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "initializer_range": 0.02,
        "intermediate_size": t["intermediate"], "is_decoder": False, "is_encoder_decoder": False,
        "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0, "max_length": 20,
        "max_position_embeddings": 32768, "min_length": 0, "mlp_bias": False, "model_type": "llama",
        "no_repeat_ngram_size": 0, "num_attention_heads": t["heads"], "num_beam_groups": 1, "num_beams": 1,
        "num_hidden_layers": t["layers"], "num_key_value_heads": t["kv_heads"], "num_return_sequences": 1,
        "output_attentions": False, "output_hidden_states": False, "output_scores": False, "pad_token_id": None,
        "prefix": None, "pretraining_tp": 1, "problem_type": None, "pruned_heads": {},
        "remove_invalid_values": False, "repetition_penalty": 1.0, "return_dict": True,
        "return_dict_in_generate": False, "rms_norm_eps": 1e-06, "rope_scaling": {"factor": 3.0, "type": "dynamic"},
        "rope_theta": 1000000.0, "sep_token_id": None, "suppress_tokens": None, "task_specific_params": None,
        "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False, "tie_word_embeddings": False,
        "tokenizer_class": None, "top_k": 1, "top_p": 0, "torch_dtype": "float32", "torchscript": False,
        "transformers_version": "4.39.3", "typical_p": 1.0, "use_bfloat16": False, "use_cache": True,
        "vocab_size": vocab_size,
    }


def _config(ids: dict[str, int], vocab_size: int, image_size: int, max_dynamic_patch: int) -> dict[str, Any]:
    v = _VISION
    return {
        "_commit_hash": None,
        "architectures": ["NVLM_D"],
        "auto_map": {
            "AutoConfig": "configuration_nvlm_d.NVLM_D_Config",
            "AutoModel": "modeling_nvlm_d.NVLM_D_Model",
            "AutoModelForCausalLM": "modeling_nvlm_d.NVLM_D_Model",
        },
        "downsample_ratio": 0.5, "dynamic_image_size": True, "force_image_size": image_size,
        "llm_config": _llm_config(ids, vocab_size),
        "max_dynamic_patch": max_dynamic_patch, "min_dynamic_patch": 1, "model_type": "NVLM_D",
        "ps_version": "v2", "select_layer": -1, "template": "chatml", "torch_dtype": "float32",
        "transformers_version": None, "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.0,
            "dropout": 0.0, "hidden_act": "gelu", "hidden_size": v["hidden"], "image_size": image_size,
            "initializer_factor": 0.1, "initializer_range": 1e-10, "intermediate_size": v["intermediate"],
            "layer_norm_eps": 1e-06, "model_type": "intern_vit_6b", "norm_type": "rms_norm",
            "num_attention_heads": v["heads"], "num_channels": 3, "num_hidden_layers": v["layers"],
            "output_attentions": False, "output_hidden_states": False, "patch_size": v["patch"],
            "qk_normalization": True, "qkv_bias": False, "return_dict": True, "torch_dtype": "float32",
            "transformers_version": "4.39.3", "use_bfloat16": False, "use_flash_attn": True,
        },
    }


def _weights(vocab_size: int, num_tokens: int, image_size: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return normal(out_f, in_f, std=in_f**-0.5)

    def around(n: int, center: float, spread: float) -> torch.Tensor:
        return center + normal(n, std=spread)

    v, t = _VISION, _TEXT
    c, hd = v["hidden"], v["hidden"] // v["heads"]
    padded = (v["heads"] + NUM_DUMMY_HEADS) * hd
    w: dict[str, torch.Tensor] = {}
    e = "vision_model.embeddings."
    w[e + "class_embedding"] = normal(1, 1, c, std=0.3)
    w[e + "patch_embedding.weight"] = normal(c, 3, v["patch"], v["patch"], std=(3 * v["patch"] ** 2) ** -0.5)
    w[e + "patch_embedding.bias"] = normal(c, std=0.05)
    w[e + "position_embedding"] = normal(1, (image_size // v["patch"]) ** 2 + 1, c, std=0.3)
    for i in range(v["layers"]):
        p = f"vision_model.encoder.layers.{i}."
        qkv = torch.zeros(3, padded, c)
        qkv[:, :c] = linear(3 * c, c).view(3, c, c)
        w[p + "attn.qkv.weight"] = qkv.view(3 * padded, c)  # real heads first, then the zero dummies
        for n in ("q_norm", "k_norm"):
            w[p + f"attn.{n}.weight"] = torch.cat([around(c, 1.0, 0.1), torch.zeros(padded - c)])
        proj = torch.zeros(c, padded)
        proj[:, :c] = linear(c, c)
        w[p + "attn.proj.weight"] = proj
        w[p + "attn.proj.bias"] = normal(c, std=0.05)
        w[p + "ls1"] = around(c, 0.5, 0.1)
        w[p + "ls2"] = around(c, 0.5, 0.1)
        w[p + "mlp.fc1.weight"] = linear(v["intermediate"], c)
        w[p + "mlp.fc1.bias"] = normal(v["intermediate"], std=0.05)
        w[p + "mlp.fc2.weight"] = linear(c, v["intermediate"])
        w[p + "mlp.fc2.bias"] = normal(c, std=0.05)
        w[p + "norm1.weight"] = around(c, 1.0, 0.1)
        w[p + "norm2.weight"] = around(c, 1.0, 0.1)
    width, h = 4 * c, t["hidden"]
    w["mlp1.0.weight"] = around(width, 1.0, 0.1)
    w["mlp1.0.bias"] = normal(width, std=0.05)
    w["mlp1.1.weight"] = linear(t["intermediate"], width)
    w["mlp1.3.weight"] = linear(h, t["intermediate"])
    hdim = h // t["heads"]
    kv = t["kv_heads"] * hdim
    w["language_model.model.embed_tokens.weight"] = normal(vocab_size, h, std=0.5)
    for i in range(t["layers"]):
        p = f"language_model.model.layers.{i}."
        for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            w[p + f"self_attn.{name}.weight"] = linear(rows, h)
            w[p + f"self_attn.{name}.bias"] = normal(rows, std=0.05)
        w[p + "self_attn.o_proj.weight"] = linear(h, h)
        w[p + "mlp.gate_proj.weight"] = linear(t["intermediate"], h)
        w[p + "mlp.up_proj.weight"] = linear(t["intermediate"], h)
        w[p + "mlp.down_proj.weight"] = linear(h, t["intermediate"])
        w[p + "input_layernorm.weight"] = around(h, 1.0, 0.1)
        w[p + "post_attention_layernorm.weight"] = around(h, 1.0, 0.1)
    w["language_model.model.norm.weight"] = around(h, 1.0, 0.1)
    w["language_model.lm_head.weight"] = linear(vocab_size, h)
    w["language_model.lm_head.weight"][num_tokens:] = 0.0
    return w


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_sharded(weights: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    """`model-0000k-of-0000n.safetensors` (names in sorted order, split evenly) + the index."""
    names = sorted(weights)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {n: weights[n].contiguous() for n in names[k * per : (k + 1) * per]}
        save_file(chunk, str(out / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in chunk})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def make_tiny_nvlm_d(
    out_dir: str | Path, seed: int = 0, image_size: int = 448, max_dynamic_patch: int = 6, shards: int = 1
) -> Path:
    """Write the tiny checkpoint into `out_dir` (created if missing) and return its path.
    `image_size` (tile side, a multiple of 28) and `max_dynamic_patch` default to NVLM-D-72B's;
    tests pass smaller tiles to keep prompts short."""
    if image_size % 28:
        raise ValueError(f"image_size must be a multiple of 28 (patch 14, pixel shuffle 2), got {image_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    ids = {t: tok.token_to_id(t) for t in (*SPECIAL_TOKENS, *EXTRA_TOKENS)}
    num_tokens = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = -(-num_tokens // 64) * 64
    tok.save(str(out / "tokenizer.json"), pretty=True)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(ids))
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    _write_json(out / "config.json", _config(ids, vocab_size, image_size, max_dynamic_patch))
    _write_json(out / "preprocessor_config.json", _preprocessor_config(image_size))
    weights = _weights(vocab_size, num_tokens, image_size, seed)
    if shards > 1:
        _save_sharded(weights, out, shards)
    else:
        save_file({n: t.contiguous() for n, t in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
