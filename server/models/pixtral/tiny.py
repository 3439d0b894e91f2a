"""Tiny random-weight Pixtral checkpoints in both real on-disk layouts.

`make_tiny_pixtral(out_dir, seed, format)` writes, at tiny sizes:
- format "hf": what `mistral-community/pixtral-12b` ships — `config.json` (Llava, nested
  `text_config` / `vision_config`), `model.safetensors` under the published names
  (`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
  `language_model.lm_head.weight`), `tokenizer.json` + `tokenizer_config.json` (with a Pixtral
  chat template), `preprocessor_config.json`, `processor_config.json`, `generation_config.json`;
- format "mistral": what `mistralai/Pixtral-12B-2409` ships — `params.json`,
  `consolidated.safetensors` (Mistral names, q/k rows in the interleaved RoPE order) and
  `tekken.json`.

Tokenizer: a tiny Tekken file cut from mistral-common's real `tekken_240911.json` (its first
792 BPE ranks, the same pattern, the same 1000 special-token slots with `[IMG]`=10,
`[IMG_BREAK]`=12, `[IMG_END]`=13, text ids from 1000 on): ~60 KB instead of 19 MB, and a 1792-row
embedding instead of 131072, while mistral-common loads it with its own loader. The HF
`tokenizer.json` is the same BPE converted to a byte-level `tokenizers` BPE, so both formats
give the same ids for the same text and one seed gives the same weights in both formats
(after the q/k permutation), i.e. the same model.

Weight scales follow `qwen2_vl/tiny.py`: attention dominates the residual stream and logits
have a spread of a few units, so greedy decoding is not degenerate; the logits of special-token
ids other than EOS are 0 (far below the max), so greedy output decodes to text.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from vlmserve.models.pixtral.mistral_format import TOKENIZER_FILE, hf_to_interleaved
from vlmserve.models.pixtral.image_processor import CLIP_MEAN, CLIP_STD
from vlmserve.models.tiny_options import check_tiny_options, padded_vocab_size

NUM_SPECIAL = 1000  # Tekken's special-token slots
NUM_BPE = 792  # 256 bytes + 536 merges of the real file
VOCAB_SIZE = NUM_SPECIAL + NUM_BPE  # 1792, a multiple of 64
EOS_ID = 2
_TEXT = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=32, intermediate=128, rope_theta=1e9)
_VISION = dict(hidden=32, layers=2, heads=2, intermediate=64, patch=16, image_size=256, rope_theta=10000.0)

# A Pixtral chat template (mistral-common v3 semantics: BOS, [INST]user[/INST], assistant text
# then EOS; the system prompt goes before the last user message; one [IMG] per image part).
PIXTRAL_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('roles must alternate user/assistant/user/... after an optional system message') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}{{- '[INST]' }}"
    "{%- if loop.last and system_message is defined %}{{- system_message + '\\n\\n' }}{%- endif %}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for chunk in message['content'] %}"
    "{%- if chunk['type'] == 'image' %}{{- '[IMG]' }}"
    "{%- elif chunk['type'] == 'text' %}{{- chunk['text'] if 'text' in chunk else chunk['content'] }}"
    "{%- else %}{{- raise_exception('unsupported content part type: ' + chunk['type']) }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('only user and assistant roles may follow the system message') }}{%- endif %}"
    "{%- endfor %}"
)


def _real_tekken() -> dict[str, Any]:
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    return json.loads(path.read_text(encoding="utf-8"))


def tiny_tekken() -> dict[str, Any]:
    """The tiny Tekken file's content (see the module docstring)."""
    real = _real_tekken()
    vocab = sorted(real["vocab"], key=lambda t: t["rank"])[:NUM_BPE]
    config = dict(real["config"], num_vocab_tokens=NUM_BPE, default_vocab_size=VOCAB_SIZE,
                  default_num_special_tokens=NUM_SPECIAL)
    return {"config": config, "vocab": vocab, "image": {"image_patch_size": _VISION["patch"],
                                                         "max_image_size": _VISION["image_size"]}}


def special_token_names() -> list[str]:
    """The 1000 special tokens of a v3 Tekken file without a special_tokens list: the legacy
    first 20 (mistral-common's table), then `<SPECIAL_i>` fillers."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    named = [t["token_str"] for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    return named + [Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=i) for i in range(len(named), NUM_SPECIAL)]


def hf_tokenizer_from_tekken(tekken: dict[str, Any]) -> Tokenizer:
    """A byte-level `tokenizers` BPE equal to the Tekken BPE: id = NUM_SPECIAL + rank; a token's
    merges are all its splits into two lower-ranked tokens, prioritised by its own rank (so the
    lowest-rank merge applies first, as in tiktoken), and whole pre-tokens found in the vocab
    are kept (`ignore_merges`, as tiktoken does)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_unicode = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in tekken["vocab"]}
    specials = special_token_names()
    vocab = {name: i for i, name in enumerate(specials)}
    merges = []
    for token, rank in ranks.items():
        vocab[text(token)] = NUM_SPECIAL + rank
        splits = [(ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, rl, rr, (text(token[:i]), text(token[i:]))) for rl, rr, i in splits]
    merges.sort()
    tok = Tokenizer(models.BPE(vocab, [m[-1] for m in merges], fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tekken["config"]["pattern"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _hf_weights(seed: int, vocab_size: int = VOCAB_SIZE) -> dict[str, torch.Tensor]:
    """Random float32 tensors under the published HF names (rotate-half q/k layout). Rows
    past the tokenizer (`vocab_size` > VOCAB_SIZE) are padding: random embeddings, LM-head
    rows 0 (logit 0, under the real tokens' maximum)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def norm_weight(n: int) -> torch.Tensor:
        return 1.0 + normal(n, std=0.05)

    t, v = _TEXT, _VISION
    h, q_rows, kv_rows = t["hidden"], t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
    embed = normal(VOCAB_SIZE, h, std=0.5)
    if vocab_size > VOCAB_SIZE:
        embed = torch.cat([embed, normal(vocab_size - VOCAB_SIZE, h, std=0.5)])
    w: dict[str, torch.Tensor] = {"language_model.model.embed_tokens.weight": embed}
    for i in range(t["layers"]):
        p = f"language_model.model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(q_rows, h, std=0.1)
        w[p + "self_attn.k_proj.weight"] = normal(kv_rows, h, std=0.1)
        w[p + "self_attn.v_proj.weight"] = normal(kv_rows, h, std=0.1)
        w[p + "self_attn.o_proj.weight"] = normal(h, q_rows, std=0.1)
        w[p + "mlp.gate_proj.weight"] = normal(t["intermediate"], h, std=0.1)
        w[p + "mlp.up_proj.weight"] = normal(t["intermediate"], h, std=0.1)
        w[p + "mlp.down_proj.weight"] = normal(h, t["intermediate"], std=0.05)
        w[p + "input_layernorm.weight"] = norm_weight(h)
        w[p + "post_attention_layernorm.weight"] = norm_weight(h)
    w["language_model.model.norm.weight"] = norm_weight(h)
    # Final hidden has unit RMS: std 0.3 over 64 dims gives logits of std ~2.4.
    lm_head = normal(VOCAB_SIZE, h, std=0.3)
    keep = lm_head[EOS_ID].clone()
    lm_head[:NUM_SPECIAL] = 0.0
    lm_head[EOS_ID] = keep
    w["language_model.lm_head.weight"] = torch.cat([lm_head, torch.zeros(vocab_size - VOCAB_SIZE, h)])

    e, mlp = v["hidden"], v["intermediate"]
    w["vision_tower.patch_conv.weight"] = normal(e, 3, v["patch"], v["patch"], std=0.02)
    w["vision_tower.ln_pre.weight"] = norm_weight(e)
    for i in range(v["layers"]):
        p = f"vision_tower.transformer.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[p + f"attention.{name}.weight"] = normal(e, e, std=0.15)
        w[p + "feed_forward.gate_proj.weight"] = normal(mlp, e, std=0.15)
        w[p + "feed_forward.up_proj.weight"] = normal(mlp, e, std=0.15)
        w[p + "feed_forward.down_proj.weight"] = normal(e, mlp, std=0.1)
        w[p + "attention_norm.weight"] = norm_weight(e)
        w[p + "ffn_norm.weight"] = norm_weight(e)
    w["multi_modal_projector.linear_1.weight"] = normal(h, e, std=0.15)
    w["multi_modal_projector.linear_1.bias"] = normal(h, std=0.02)
    w["multi_modal_projector.linear_2.weight"] = normal(h, h, std=0.1)
    w["multi_modal_projector.linear_2.bias"] = normal(h, std=0.02)
    return w


_TO_MISTRAL = (
    ("language_model.model.embed_tokens.", "tok_embeddings."),
    ("language_model.model.norm.", "norm."),
    ("language_model.lm_head.", "output."),
    ("language_model.model.layers.", "layers."),
    ("vision_tower.", "vision_encoder."),
    ("multi_modal_projector.linear_1.", "vision_language_adapter.w_in."),
    ("multi_modal_projector.linear_2.", "vision_language_adapter.w_out."),
)
_INNER_TO_MISTRAL = (
    ("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
    ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
    ("attention.q_proj", "attention.wq"), ("attention.k_proj", "attention.wk"),
    ("attention.v_proj", "attention.wv"), ("attention.o_proj", "attention.wo"),
    ("mlp.gate_proj", "feed_forward.w1"), ("mlp.down_proj", "feed_forward.w2"), ("mlp.up_proj", "feed_forward.w3"),
    ("feed_forward.gate_proj", "feed_forward.w1"), ("feed_forward.down_proj", "feed_forward.w2"),
    ("feed_forward.up_proj", "feed_forward.w3"),
    ("input_layernorm", "attention_norm"), ("post_attention_layernorm", "ffn_norm"),
)


def _mistral_weights(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in hf.items():
        new = next(m + name[len(p):] for p, m in _TO_MISTRAL if name.startswith(p))
        for old, repl in _INNER_TO_MISTRAL:
            new = new.replace(f".{old}.", f".{repl}.")
        if new.endswith(("wq.weight", "wk.weight")):
            if new.startswith("vision_encoder."):
                heads = _VISION["heads"]
            else:
                heads = _TEXT["heads"] if new.endswith("wq.weight") else _TEXT["kv_heads"]
            tensor = hf_to_interleaved(tensor, heads).contiguous()
        out[new] = tensor
    return out


def _hf_config(vocab_size: int = VOCAB_SIZE) -> dict[str, Any]:
    t, v = _TEXT, _VISION
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_seq_length": 1,
        "image_token_index": 10,
        "model_type": "llava",
        "projector_hidden_act": "gelu",
        "text_config": {
            "head_dim": t["head_dim"], "hidden_act": "silu", "hidden_size": t["hidden"],
            "intermediate_size": t["intermediate"], "max_position_embeddings": 1024000, "model_type": "mistral",
            "num_attention_heads": t["heads"], "num_hidden_layers": t["layers"],
            "num_key_value_heads": t["kv_heads"], "rms_norm_eps": 1e-05, "rope_theta": t["rope_theta"],
            "sliding_window": None, "vocab_size": vocab_size,
        },
        "torch_dtype": "float32",
        "transformers_version": "4.45.0.dev0",
        "vision_config": {
            "head_dim": v["hidden"] // v["heads"], "hidden_act": "silu", "hidden_size": v["hidden"],
            "image_size": v["image_size"], "intermediate_size": v["intermediate"], "model_type": "pixtral",
            "num_attention_heads": v["heads"], "num_hidden_layers": v["layers"], "patch_size": v["patch"],
            "rope_theta": v["rope_theta"],
        },
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
    }


def _params(vocab_size: int = VOCAB_SIZE) -> dict[str, Any]:
    t, v = _TEXT, _VISION
    return {
        "dim": t["hidden"], "n_layers": t["layers"], "head_dim": t["head_dim"], "hidden_dim": t["intermediate"],
        "n_heads": t["heads"], "n_kv_heads": t["kv_heads"], "rope_theta": t["rope_theta"], "norm_eps": 1e-05,
        "vocab_size": vocab_size,
        "vision_encoder": {
            "hidden_size": v["hidden"], "num_channels": 3, "image_size": v["image_size"], "patch_size": v["patch"],
            "rope_theta": v["rope_theta"], "intermediate_size": v["intermediate"],
            "num_hidden_layers": v["layers"], "num_attention_heads": v["heads"], "image_token_id": 10,
            "image_break_token_id": 12, "image_end_token_id": 13, "adapter_bias": True,
        },
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_pixtral(
    out_dir: str | Path, seed: int = 0, format: str = "hf", vocab_size: int | None = None,
    generation_config: str = "published",
) -> Path:
    """Write the tiny checkpoint into `out_dir` (created if missing) and return its path.

    `vocab_size`: model rows (default VOCAB_SIZE; 131072 is the real size); the Tekken file
    keeps its 1792 ids. `generation_config`: the published HF file,
    huggingface.co/mistral-community/pixtral-12b/blob/59bdd82/generation_config.json, holds
    only bos/eos ids (no sampling defaults: greedy in transformers), so "published" and
    "greedy" write the same file; the Mistral format ships none."""
    if format not in ("hf", "mistral"):
        raise ValueError(f"format must be 'hf' or 'mistral', got {format!r}")
    check_tiny_options(generation_config)
    vocab_size = padded_vocab_size(VOCAB_SIZE, vocab_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tekken = tiny_tekken()
    weights = _hf_weights(seed, vocab_size)
    if format == "mistral":
        _write_json(out / "params.json", _params(vocab_size))
        (out / TOKENIZER_FILE).write_text(json.dumps(tekken, ensure_ascii=False), encoding="utf-8")
        save_file(_mistral_weights(weights), str(out / "consolidated.safetensors"))
        return out
    hf_tokenizer_from_tekken(tekken).save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": PIXTRAL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "PixtralProcessor",
    })
    _write_json(out / "config.json", _hf_config(vocab_size))
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": EOS_ID})
    _write_json(out / "preprocessor_config.json", {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "image_processor_type": "PixtralImageProcessor",
        "patch_size": {"height": _VISION["patch"], "width": _VISION["patch"]}, "processor_class": "PixtralProcessor",
        "resample": 3, "rescale_factor": 1 / 255, "size": {"longest_edge": _VISION["image_size"]},
    })
    _write_json(out / "processor_config.json", {
        "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]", "image_token": "[IMG]",
        "patch_size": _VISION["patch"], "processor_class": "PixtralProcessor",
    })
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
