"""A checkpoint's generation_config.json as sampling defaults named as in SamplingParams, the
one rule every family's processor applies: as in transformers, sampling is off unless
`do_sample` is true, and then the defaults are greedy (temperature 0)."""

from __future__ import annotations

from typing import Any


def sampling_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    cfg = generation_config
    out: dict[str, Any] = {}
    if cfg.get("repetition_penalty") is not None:
        out["repetition_penalty"] = float(cfg["repetition_penalty"])
    if not cfg.get("do_sample", False):
        out["temperature"] = 0.0
        return out
    for key, cast in (("temperature", float), ("top_p", float), ("top_k", int)):
        if cfg.get(key) is not None:
            out[key] = cast(cfg[key])
    return out
