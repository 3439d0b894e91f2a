from __future__ import annotations

import pytest

from vlmserve.api.errors import APIError
from vlmserve.api.protocol import ChatCompletionRequest, CompletionRequest
from vlmserve.api.sampling import build_sampling_params, params_for_choice, resolve_max_tokens

MSGS = [{"role": "user", "content": "hi"}]


def _chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=MSGS, **kw)


def _build(request, defaults=None, prompt_len=10, max_model_len=100):
    return build_sampling_params(request, defaults=defaults or {}, prompt_len=prompt_len, max_model_len=max_model_len)


def test_request_values_win_over_defaults_which_win_over_sampling_params_defaults():
    p = _build(_chat(top_p=0.5), defaults={"temperature": 0.6, "top_p": 0.9, "top_k": 20, "unrelated": 3})
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.6, 0.5, 20, 0.0)


def test_temperature_zero_is_greedy_whatever_the_defaults():
    p = _build(_chat(temperature=0), defaults={"temperature": 0.7})
    assert p.greedy and p.temperature == 0


def test_max_tokens_defaults_to_the_rest_of_the_context():
    assert _build(_chat(), prompt_len=30, max_model_len=100).max_tokens == 70
    # A checkpoint default is capped to the room left.
    assert _build(_chat(), defaults={"max_tokens": 20}, prompt_len=30).max_tokens == 20
    assert _build(_chat(), defaults={"max_tokens": 500}, prompt_len=30).max_tokens == 70


def test_max_completion_tokens_wins_over_max_tokens():
    assert _build(_chat(max_tokens=5, max_completion_tokens=7)).max_tokens == 7


def test_output_budget_errors_name_both_numbers():
    with pytest.raises(APIError, match=r"max_tokens of 95 plus the prompt's 10 tokens .* 100 tokens.* at most 90"):
        resolve_max_tokens(95, "max_tokens", prompt_len=10, max_model_len=100)
    with pytest.raises(APIError, match="120 tokens but the model's context is 100"):
        resolve_max_tokens(None, "max_tokens", prompt_len=120, max_model_len=100)
    with pytest.raises(APIError, match="at least 1"):
        resolve_max_tokens(0, "max_tokens", prompt_len=1, max_model_len=100)


def test_every_field_is_carried_over():
    p = _build(_chat(seed=3, stop="##", stop_token_ids=[5, 6], presence_penalty=0.5, frequency_penalty=-0.5,
                     repetition_penalty=1.1, min_p=0.05, top_k=4, ignore_eos=True, min_tokens=2,
                     skip_special_tokens=False, include_stop_str_in_output=True, n=3, logprobs=True))
    assert (p.seed, p.stop, p.stop_token_ids, p.n, p.logprobs) == (3, ("##",), (5, 6), 3, 0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.top_k) == (0.5, -0.5, 1.1,
                                                                                                  0.05, 4)
    assert p.ignore_eos and p.min_tokens == 2 and not p.skip_special_tokens and p.include_stop_str_in_output


def test_completion_logprobs_is_the_top_count():
    assert _build(CompletionRequest(model="m", prompt="x", logprobs=4)).logprobs == 4
    assert _build(CompletionRequest(model="m", prompt="x")).logprobs is None


@pytest.mark.parametrize("kw, param, allowed", [
    ({"temperature": -0.1}, "temperature", "[0, 2]"),
    ({"temperature": 2.01}, "temperature", "[0, 2]"),
    ({"top_p": 0}, "top_p", "(0, 1]"),
    ({"top_p": 1.01}, "top_p", "(0, 1]"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
    ({"presence_penalty": -3}, "presence_penalty", "[-2, 2]"),
    ({"n": 129}, "n", "[1, 128]"),
    ({"min_p": 2}, "min_p", "[0, 1]"),
    ({"top_k": -5}, "top_k", "-1, 0"),
    ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"n": 0}, "n", "[1, 128]"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ({"min_tokens": 500}, "min_tokens", "[0, max_tokens=90]"),
    ({"stop": ["ok", ""]}, "stop", "non-empty"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", "non-negative"),
    ({"temperature": float("nan")}, "temperature", "finite"),
    ({"seed": 2**63 - 1, "n": 2}, "seed", f"{2**63 - 2}]"),
])
def test_out_of_range_values_are_400_naming_param_and_range(kw, param, allowed):
    with pytest.raises(APIError) as info:
        _build(_chat(**kw))
    assert info.value.status_code == 400 and info.value.param == param and allowed in info.value.message


def test_openai_range_ends_are_accepted():
    p = _build(_chat(temperature=2, top_p=1, presence_penalty=-2, frequency_penalty=2, n=128))
    assert (p.temperature, p.top_p, p.presence_penalty, p.frequency_penalty, p.n) == (2, 1, -2, 2, 128)
    # vLLM's own fields keep vLLM's ranges: repetition_penalty past 2 is allowed.
    assert _build(_chat(repetition_penalty=3.0, top_k=-1)).repetition_penalty == 3.0


def test_each_choice_gets_n_1_and_an_offset_seed():
    p = _build(_chat(n=3, seed=10))
    assert [(q.n, q.seed) for q in (params_for_choice(p, i) for i in range(3))] == [(1, 10), (1, 11), (1, 12)]
    unseeded = _build(_chat(n=2))
    assert params_for_choice(unseeded, 1).seed is None
