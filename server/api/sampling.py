"""OpenAI request → `SamplingParams` (pure; no engine, no I/O).

Precedence per field: the request's value, else the checkpoint's generation_config
default (`EngineClient.generation_defaults()`), else the `SamplingParams` default. A
request's `temperature: 0` is greedy whatever the defaults say.

`n` is fanned out by the API layer: each of the n engine requests gets `n=1`, and with a
seed, choice i uses `seed + i` so that the choices differ yet the whole response is
reproducible.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from vlmserve.api.errors import APIError
from vlmserve.api.protocol import SamplingRequest
from vlmserve.engine.sampling_params import SEED_RANGE, SamplingParams
from vlmserve.engine.structured_spec import StructuredSpec

MAX_TOP_LOGPROBS = 20
MAX_N = 128
# Keys of generation_defaults() a checkpoint may set; anything else there is ignored.
_DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                "frequency_penalty")
# A 64-bit signed seed (what torch generators take), leaving room for seed + i.
_SEED_MIN, _SEED_MAX = SEED_RANGE
# Stop strings are searched in every request's new text on the serving event loop, and stop
# token ids are scanned by the sampler each step: unbounded lists stall every other request.
MAX_STOP_STRINGS = 256
MAX_STOP_TOKEN_IDS = 1024
# OpenAI's documented ranges, checked on the request's own values (a 400 naming field and
# range); vLLM's extensions (top_k, min_p, repetition_penalty) keep vLLM's, in SamplingParams.
OPENAI_RANGES = {"temperature": (0.0, 2.0), "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def resolve_max_tokens(
    requested: int | None, field: str, *, prompt_len: int, max_model_len: int, default: int | None = None
) -> int:
    """The output budget: the request's, else the checkpoint's default capped to the rest of
    the context, else the rest of the context. Errors name both numbers."""
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(
            f"the prompt has {prompt_len} tokens but the model's context is {max_model_len} tokens, leaving no "
            "room for output; shorten the messages or send fewer or smaller images",
            param="messages", code="context_length_exceeded",
        )
    if requested is None:
        return min(default, room) if default is not None and default > 0 else room
    if requested < 1:
        raise APIError(f"{field} must be at least 1, got {requested}", param=field)
    if requested > room:
        raise APIError(
            f"{field} of {requested} plus the prompt's {prompt_len} tokens exceeds the model's context of "
            f"{max_model_len} tokens; lower {field} to at most {room} or shorten the prompt",
            param=field, code="context_length_exceeded",
        )
    return requested


def _stops(request: SamplingRequest) -> tuple[str, ...]:
    stop = request.stop
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", param="stop")
    if any(s == "" for s in stops):
        raise APIError("stop strings must be non-empty", param="stop")
    return stops


def build_sampling_params(
    request: SamplingRequest, *, defaults: dict[str, Any], prompt_len: int, max_model_len: int,
    structured: StructuredSpec | None = None,
) -> SamplingParams:
    """`structured`: the request's validated output constraint (`vlmserve.api.structured`)."""
    requested, max_field = request.requested_max_tokens()
    max_tokens = resolve_max_tokens(
        requested, max_field, prompt_len=prompt_len, max_model_len=max_model_len, default=defaults.get("max_tokens")
    )
    num_logprobs, logprobs_field = request.requested_logprobs()
    if num_logprobs is not None and not 0 <= num_logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(
            f"{logprobs_field} must be in [0, {MAX_TOP_LOGPROBS}], got {num_logprobs}", param=logprobs_field
        )
    n = 1 if request.n is None else request.n
    if not 1 <= n <= MAX_N:
        raise APIError(f"n must be in [1, {MAX_N}], got {n}", param="n")
    if request.min_tokens < 0 or request.min_tokens > max_tokens:
        raise APIError(
            f"min_tokens must be in [0, max_tokens={max_tokens}], got {request.min_tokens}", param="min_tokens"
        )
    for key in _DEFAULTABLE:
        value = getattr(request, key)
        if isinstance(value, float) and not math.isfinite(value):  # JSON parsers accept NaN
            raise APIError(f"{key} must be a finite number, got {value}", param=key)
    for key, (low, high) in OPENAI_RANGES.items():
        value = getattr(request, key)
        if value is not None and not low <= value <= high:
            raise APIError(f"{key} must be in [{low:g}, {high:g}], got {value}", param=key)
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise APIError(f"top_p must be in (0, 1], got {request.top_p}", param="top_p")
    if request.seed is not None and not _SEED_MIN <= request.seed <= _SEED_MAX - (n - 1):
        raise APIError(f"seed must be in [{_SEED_MIN}, {_SEED_MAX - (n - 1)}] (choice i uses seed + i), "
                       f"got {request.seed}", param="seed")
    if any(t < 0 for t in request.stop_token_ids or ()):
        raise APIError("stop_token_ids must be non-negative token ids", param="stop_token_ids")
    if len(request.stop_token_ids or ()) > MAX_STOP_TOKEN_IDS:
        raise APIError(f"stop_token_ids has {len(request.stop_token_ids or ())} ids; at most "
                       f"{MAX_STOP_TOKEN_IDS} are allowed", param="stop_token_ids")

    values: dict[str, Any] = {k: defaults[k] for k in _DEFAULTABLE if defaults.get(k) is not None}
    for key in _DEFAULTABLE:
        value = getattr(request, key)
        if value is not None:
            values[key] = value
    values.update(
        max_tokens=max_tokens,
        seed=request.seed,
        stop=_stops(request),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        include_stop_str_in_output=request.include_stop_str_in_output,
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        logprobs=num_logprobs,
        n=n,
        skip_special_tokens=request.skip_special_tokens,
        structured=structured,
    )
    assert set(values) <= _SAMPLING_FIELDS
    try:
        return SamplingParams(**values)
    except ValueError as e:
        # SamplingParams' messages start with the field name and state the allowed range.
        field = str(e).split(" ", 1)[0]
        raise APIError(str(e), param=field if field in _SAMPLING_FIELDS else None) from None


def params_for_choice(params: SamplingParams, index: int) -> SamplingParams:
    """The engine request of choice `index` of an n-choice response."""
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)
