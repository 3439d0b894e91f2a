"""Admission checks: a request the scheduler could never schedule is refused before it queues
(plain Python; no torch).

Owner: `Scheduler.add_request`. The scheduler never raises on an admitted request, and never
lets one wait forever: everything that bounds a single request (context, KV pool, encoder
budget and cache, cross K/V pool) is checked here, against the request running alone. Each
refusal is a ValueError whose message names the limit, what the request needed, and the flag
that raises the limit; the API answers it with a 400.
"""

from __future__ import annotations

from vlmserve.config import EngineConfig
from vlmserve.engine.cross_kv_manager import CrossKVManager
from vlmserve.engine.request import Request


def check_admissible(
    request: Request, config: EngineConfig, max_model_len: int, num_kv_blocks: int, cross_kv: CrossKVManager | None
) -> None:
    """Raises ValueError if the request could not be scheduled even with the engine to itself."""
    capacity = num_kv_blocks * config.block_size
    n = request.num_prompt_tokens
    if n == 0:
        raise ValueError("the prompt is empty; send at least one token")
    if n >= max_model_len:
        raise ValueError(
            f"the prompt has {n} tokens but max_model_len is {max_model_len}: "
            "shorten the prompt or raise --max-model-len"
        )
    if n > capacity:
        raise ValueError(
            f"the prompt has {n} tokens but the whole KV cache holds "
            f"{capacity} ({num_kv_blocks} blocks of "
            f"{config.block_size}): shorten the prompt or raise --kv-cache-memory-gb or --num-kv-blocks"
        )
    limit = min(config.encoder_cache_size, config.max_encoder_tokens_per_step)
    limits = (f"encoder_cache_size={config.encoder_cache_size}, "
              f"max_encoder_tokens_per_step={config.max_encoder_tokens_per_step}")
    for item in request.mm_items:
        if item.encoder_rows > limit:
            raise ValueError(
                f"an {item.modality} needs {item.encoder_rows} encoder rows but at most "
                f"{limit} fit ({limits}): send a smaller image or raise --encoder-cache-size "
                "and --max-encoder-tokens-per-step"
            )
    if any(item.cross_attn_tokens for item in request.mm_items):
        # A cross-attention request has all its images encoded in the step that admits it
        # (`schedule`): together they must fit one step, or it would wait at the head of
        # the queue forever, and everyone behind it with it.
        rows = sum({item.content_hash: item.encoder_rows for item in request.mm_items}.values())
        if rows > limit:
            raise ValueError(
                f"the {len(request.mm_items)} images need {rows} encoder rows together (this model "
                f"encodes all of a request's images at once) but at most {limit} fit ({limits}): "
                "send fewer or smaller images or raise --encoder-cache-size and "
                "--max-encoder-tokens-per-step"
            )
        if cross_kv is None:
            raise ValueError("this model has no cross-attention: its items must not carry cross_attn_tokens")
        if cross_kv.num_blocks_needed(request) > cross_kv.num_blocks:
            raise ValueError(
                f"the images need {CrossKVManager.num_rows(request)} cross-attention rows but the cross "
                f"K/V pool holds {cross_kv.num_blocks * config.block_size}: send fewer or smaller "
                "images or raise --num-cross-kv-blocks"
            )
