"""SamplingParams refuses values the engine's tensors cannot hold: one bad request must not
fail a step shared with others."""

import math

import pytest

from vlmserve.engine.sampling_params import MAX_TOP_K, SamplingParams


@pytest.mark.parametrize("kwargs, match", [
    ({"top_k": MAX_TOP_K + 1}, "top_k"),
    ({"top_k": -2}, "top_k"),
    ({"temperature": math.nan}, "temperature must be a finite"),
    ({"top_p": math.inf}, "top_p must be a finite"),
    ({"repetition_penalty": math.nan}, "repetition_penalty"),
    ({"seed": 2**63}, "seed"),
    ({"stop_token_ids": (3, -1)}, "stop_token_ids"),
    ({"stop_token_ids": (2**63,)}, "stop_token_ids"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"logprobs": -1}, "logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n must be"),
])
def test_out_of_range_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_limits_themselves_are_accepted():
    p = SamplingParams(top_k=MAX_TOP_K, seed=-(2**63), stop_token_ids=(0, 2**63 - 1), logprobs=0, min_tokens=0)
    assert p.top_k == MAX_TOP_K
