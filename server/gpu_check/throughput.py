"""The throughput section: a random-weight Qwen2-VL at the published 2B shape, bf16, on the
device. Decode tokens/s against the HBM roofline (each decode step reads every language-model
weight once, so one sequence cannot beat bandwidth / weight bytes), prefill MFU (model FLOPs
over the device's dense bf16 peak), the offline image workload, and the engine's memory log."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from vlmserve.bench import run_offline_bench
from vlmserve.config import EngineConfig
from vlmserve.engine.llm import LLM
from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.gpu_check.hardware import peaks_for
from vlmserve.gpu_check.sections import Context
from vlmserve.models.registry import make_tiny_model

# Qwen2-VL-2B-Instruct's config.json sizes (vision tower included); token ids come from the
# tiny checkpoint whose tokenizer the big one borrows (its vocabulary fits in 151,936 rows).
QWEN2_VL_2B = {
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
    "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True, "max_window_layers": 28,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
                      "spatial_patch_size": 14, "temporal_patch_size": 2},
}


def make_checkpoint(ctx: Context) -> Path:
    """The tiny checkpoint when dry; else its tokenizer and processor files around random
    weights of the 2B shape, written by transformers (so the names are the published ones)."""
    tiny = make_tiny_model("qwen2_vl", ctx.path("ckpt", "qwen2_vl_tiny", ".keep").parent, seed=0)
    if ctx.dry:
        return tiny
    out = ctx.path("ckpt", "qwen2_vl_2b_shape", ".keep").parent
    if (out / "config.json").exists():
        return out
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = {**json.loads((tiny / "config.json").read_text()), **QWEN2_VL_2B, "torch_dtype": "bfloat16"}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    for f in tiny.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    return out


def _language_model_bytes(llm: LLM) -> int:
    return sum(p.numel() * p.element_size() for n, p in llm.runner.model.named_parameters()
               if "visual" not in n and "vision" not in n)


def _decode(llm: LLM, batch: int, tokens: int) -> float:
    """Aggregate decode tokens/s of `batch` text sequences past their first token."""
    prompts = [llm.render_chat([{"role": "user", "content": f"story number {i}"}]) for i in range(batch)]
    done = llm.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    start = max(c.first_token_time for c in done)
    end = max(c.finish_time for c in done)
    return batch * (tokens - 1) / max(end - start, 1e-9)


def _prefill(llm: LLM, prompt_tokens: int) -> tuple[float, int]:
    words = " ".join(["word"] * prompt_tokens)
    prompt = llm.render_chat([{"role": "user", "content": words}])
    n = len(prompt.prompt_token_ids)
    (c,) = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    return c.first_token_time - c.arrival_time, n


def throughput(ctx: Context) -> dict[str, Any]:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("vlmserve").addHandler(handler)
    try:
        ckpt = make_checkpoint(ctx)
        dtype = "float32" if ctx.dry else "bfloat16"
        # On the device the KV cache is sized by --gpu-memory-utilization: its log is the report's.
        config = EngineConfig(model=str(ckpt), device=ctx.device, dtype=dtype,
                              kv_cache_memory_gb=0.25 if ctx.dry else None)
        llm = LLM(config)
        weight_bytes = _language_model_bytes(llm)
        decode_tokens = 8 if ctx.dry else 128
        _decode(llm, 1, 4)  # warm-up: kernels compile on first use
        single = _decode(llm, 1, decode_tokens)
        batched = _decode(llm, 4 if ctx.dry else 64, decode_tokens)
        prefill_s, prefill_n = _prefill(llm, 64 if ctx.dry else 2000)
        spec = llm.runner.model.kv_cache_spec
        params = weight_bytes / torch.empty((), dtype=getattr(torch, dtype)).element_size()
        # 2 FLOPs per weight per token, plus causal attention's QK^T and PV (half of 4·T²·d per layer).
        flops = 2 * params * prefill_n + 2 * spec.num_layers * prefill_n**2 * spec.num_kv_heads * spec.head_dim
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the bench's engine sizes its cache from what is free
        bench = run_offline_bench(config, num_requests=4 if ctx.dry else 64, image_size="56x56" if ctx.dry else "448x448",
                                  images_per_request=1, prompt_words=16, max_tokens=8 if ctx.dry else 64, seed=0)
        result: dict[str, Any] = {
            "ok": True, "checkpoint": str(ckpt), "dtype": dtype, "language_model_weight_bytes": weight_bytes,
            "decode_tokens_per_s_batch1": single, "decode_tokens_per_s_batched": batched,
            "prefill_tokens": prefill_n, "prefill_s": prefill_s, "prefill_tokens_per_s": prefill_n / prefill_s,
            "offline_bench": bench, "memory_log": [r for r in records if "KV" in r or "memory" in r],
        }
        peaks = peaks_for(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
        if peaks is not None:
            result["roofline_decode_tokens_per_s_batch1"] = peaks.hbm_bytes_per_s / weight_bytes
            result["decode_fraction_of_roofline"] = single / result["roofline_decode_tokens_per_s_batch1"]
            result["prefill_mfu"] = flops / prefill_s / peaks.bf16_flops
        return result
    finally:
        logging.getLogger("vlmserve").removeHandler(handler)
