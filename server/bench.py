"""`vlmserve bench`: an offline synthetic image+text workload through the engine.

Every request gets its own random image (no prefix or encoder cache can help) and a prompt
of random words; all requests arrive at once; `ignore_eos` makes every request produce
exactly `max_tokens` tokens. Prints requests/s, output tokens/s and time to first token.

`sampling`: "greedy" (temperature 0), or "checkpoint": the checkpoint's generation_config
defaults, as the API applies them to a request that sets none (Qwen2-VL's published ones:
temperature 0.1, top_p 0.001, top_k 1, repetition_penalty 1.05), each request seeded.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from PIL import Image

from vlmserve.config import EngineConfig
from vlmserve.engine.llm import LLM
from vlmserve.engine.sampling_params import SamplingParams

SAMPLING_MODES = ("greedy", "checkpoint")
_DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_WORDS = (
    "the a cat dog image photo shows what is in this picture describe colour red blue green small large "
    "left right top bottom person car tree sky house road water light dark"
).split()


def _parse_size(size: str) -> tuple[int, int]:
    w, _, h = size.lower().partition("x")
    return int(w), int(h)


def synthetic_requests(n: int, image_size: str, images_per_request: int, prompt_words: int, seed: int):
    rng = np.random.default_rng(seed)
    w, h = _parse_size(image_size)
    out = []
    for _ in range(n):
        images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(images_per_request)]
        text = " ".join(rng.choice(_WORDS, prompt_words))
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        out.append(([{"role": "user", "content": content}], images))
    return out


def params_summary(p: SamplingParams) -> str:
    return (f"temperature={p.temperature} top_p={p.top_p} top_k={p.top_k} min_p={p.min_p} "
            f"repetition_penalty={p.repetition_penalty}")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_offline_bench(
    config: EngineConfig,
    *,
    num_requests: int,
    image_size: str,
    images_per_request: int,
    prompt_words: int,
    max_tokens: int,
    seed: int,
    sampling: str = "greedy",
) -> dict[str, float]:
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {', '.join(SAMPLING_MODES)}, got {sampling!r}")
    llm = LLM(config)
    if sampling == "greedy":
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    else:
        defaults = {k: v for k, v in llm.processor.generation_defaults().items() if k in _DEFAULTABLE}
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=seed, **defaults)
    warm = synthetic_requests(2, image_size, images_per_request, prompt_words, seed + 10_000)
    llm.generate([llm.render_chat(c, i) for c, i in warm], params)

    reqs = synthetic_requests(num_requests, image_size, images_per_request, prompt_words, seed)
    t0 = time.perf_counter()
    prompts = [llm.render_chat(c, i) for c, i in reqs]
    t_pre = time.perf_counter() - t0
    steps0 = llm.runner.num_forward_passes
    t1 = time.perf_counter()
    # Each request its own seed (seed + i): seeded draws are per request, as in serving.
    per_request = [params if params.seed is None else dataclasses.replace(params, seed=seed + i) for i in range(len(prompts))]
    done = llm.generate(prompts, per_request)
    t_gen = time.perf_counter() - t1
    total = t_pre + t_gen

    out_tokens = sum(len(c.token_ids) for c in done)
    # Requests arrive together at t0 (before preprocessing), so TTFT includes it.
    ttft = [(c.first_token_time - t1 + t_pre) * 1000 for c in done if c.first_token_time is not None]
    prompt_tokens = sum(len(c.prompt_token_ids) for c in done)
    stats = {
        "requests": num_requests,
        "requests_per_s": num_requests / total,
        "output_tokens_per_s": out_tokens / total,
        "prompt_tokens_per_s": prompt_tokens / total,
        "ttft_ms_p50": _pct(ttft, 50),
        "ttft_ms_p90": _pct(ttft, 90),
        "ttft_ms_p99": _pct(ttft, 99),
        "preprocess_s": t_pre,
        "generate_s": t_gen,
        "forward_passes": llm.runner.num_forward_passes - steps0,
        "mean_prompt_tokens": prompt_tokens / num_requests,
    }
    print(
        f"vlmserve bench: {num_requests} requests, {images_per_request} image(s) of {image_size}, "
        f"{prompt_words} prompt words, {max_tokens} output tokens each, sampling {sampling}: {params_summary(params)}"
    )
    for key, value in stats.items():
        print(f"  {key:22s} {value:.2f}" if isinstance(value, float) else f"  {key:22s} {value}")
    return stats
