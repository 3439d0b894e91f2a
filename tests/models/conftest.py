"""Tiny random Qwen2-VL checkpoints written by transformers itself (float32), shared by the
model, loader and rotary tests. Sizes: text hidden 64, 4 heads of 16, 2 KV heads, 2 layers;
vision embed 32, 2 heads, 2 layers; mrope_section [2, 3, 3] sums to head_dim / 2 = 8."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

TINY_VOCAB = 300
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 290, 291, 292, 293


def tiny_hf_config(tie_word_embeddings: bool = False):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            bos_token_id=None,
            eos_token_id=None,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            temporal_patch_size=2,
            in_channels=3,
            spatial_merge_size=2,
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        tie_word_embeddings=tie_word_embeddings,
    )


def _make_hf_tiny(out_dir: Path, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_hf_config(tie_word_embeddings)).float().eval()
    with torch.no_grad():
        # The default init (std 0.02, unit norms) gives near-uniform logits, where greedy
        # decoding would hinge on 1e-7 differences; larger weights give clear argmaxes.
        for name, p in model.named_parameters():
            is_norm = "norm" in name or "ln_q" in name
            if p.dim() >= 2:
                p.normal_(0.0, 0.5 if "embed_tokens" in name else 0.15)
            elif is_norm and name.endswith("weight"):
                p.normal_(1.0, 0.05)
            else:
                p.normal_(0.0, 0.05 if not is_norm else 0.02)
    model.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def make_hf_tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make_hf_tiny(seed=0, tie_word_embeddings=False) -> checkpoint dir (cached per args)."""
    cache: dict[tuple[int, bool], Path] = {}

    def make(seed: int = 0, tie_word_embeddings: bool = False) -> Path:
        key = (seed, tie_word_embeddings)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"hf_tiny_qwen2_vl_{seed}_{int(tie_word_embeddings)}")
            cache[key] = _make_hf_tiny(out, seed, tie_word_embeddings)
        return cache[key]

    return make


def save_random_hf_model(model: torch.nn.Module, out_dir: Path, seed: int = 0, files_from: Path | None = None) -> Path:
    """Give a transformers model built from a config random weights at scales that keep greedy
    decoding clear of near-ties (matrices ~1.2 / sqrt(fan_in), embeddings 0.5, norms ~1,
    Mllama-style gates ~tanh(0.7)), then `save_pretrained` it to `out_dir`. `files_from`: a
    checkpoint whose tokenizer and processor JSON files are copied in beside it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 0.5 if "embed" in name else 1.2 / p[0].numel() ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("weight") and ("norm" in name or "ln_" in name):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.05)
            elif "gate" in name:
                p.copy_(0.7 + torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "class_embedding" in name else 0.05))
    model.save_pretrained(out_dir)
    if files_from is not None:
        for f in Path(files_from).iterdir():
            if f.suffix == ".json" and f.name not in ("config.json", "generation_config.json"):
                shutil.copy(f, Path(out_dir) / f.name)
    return Path(out_dir)
