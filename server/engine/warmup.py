"""Warm-up before readiness, and timing of the front-end's preprocessing stages.

`run_warmup(engine)`: one short request through the whole path (render, vision encoder,
prefill, one decode step) before /ready first answers 200, so the first user request does
not pay first-call costs. Its request id starts with `WARMUP_PREFIX`, and the engine keeps it
out of the request metrics. The probe image is small; if this deployment's limits refuse it
(a tiny encoder budget), the warm-up falls back to text and says so.

`time_preprocessing(processor, metrics)`: the family processors resize images in their
`image_processor` (and videos in `video_processor`); wrapping that method on this one
processor instance gives the "resize" stage of vlmserve:media_stage_seconds without the
families knowing about metrics.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import numpy as np
from PIL import Image

from vlmserve.engine.client import RequestRejected
from vlmserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

WARMUP_PREFIX = "vlmserve-warmup-"
_PROBE_SIDE = 56  # px: a multiple of every family's patch grid here (14, 16, 28)


def _probe_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (_PROBE_SIDE, _PROBE_SIDE, 3), dtype=np.uint8))


async def _one(engine: Any, prompt: Any, name: str) -> None:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    async for _ in engine.generate(prompt, params, WARMUP_PREFIX + name):
        pass


async def run_warmup(engine: Any) -> None:
    """Raises what the engine raises if it cannot serve (EngineDeadError): startup fails."""
    if "image" in engine.modalities:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
        try:
            prompt = await engine.render_chat(conversation, [_probe_image()])
            await _one(engine, prompt, "image")
            return
        except (RequestRejected, ValueError) as e:
            logger.warning("warm-up: the probe image was refused (%s); warming up with text only", e)
    prompt = await engine.render_chat([{"role": "user", "content": "Hello."}], [])
    await _one(engine, prompt, "text")


def _timed(fn: Any, observe: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            observe(time.perf_counter() - t0)

    return wrapper


def time_preprocessing(processor: Any, metrics: Any) -> None:
    """Times `resize` where the family has one (Qwen2-VL: the step that dominates), else its
    whole `preprocess` (Pixtral, Mllama: resize, rescale and normalise in one call)."""
    observe = functools.partial(metrics.media_stage, "resize")
    for attr in ("image_processor", "video_processor"):
        sub = getattr(processor, attr, None)
        method = next((m for m in ("resize", "preprocess") if callable(getattr(sub, m, None))), None)
        if method is None:
            continue
        try:  # object.__setattr__: some processors are frozen dataclasses
            object.__setattr__(sub, method, _timed(getattr(sub, method), observe))
        except (AttributeError, TypeError):
            logger.info("the %s cannot be timed (no instance attributes): no resize metrics", attr)
