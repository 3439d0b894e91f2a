import math

import torch

from vlmserve.engine.sampling_params import SamplingParams
from vlmserve.runner.input_batch import CachedRequestState
from vlmserve.runner.sampler import Sampler


def _st(params, tokens=(1, 2, 3), n_prompt=3):
    return CachedRequestState("r", list(tokens), n_prompt, [], params, [0], len(tokens))


def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2, -1.0], [5.0, 0.0, 0.0, 0.0]])
    tokens, _ = Sampler(frozenset())(logits, [_st(SamplingParams(temperature=0)), _st(SamplingParams(temperature=0))])
    assert tokens == [1, 0]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    torch.manual_seed(0)
    logits = torch.randn(1, 1000)
    s = Sampler(frozenset())
    draws = lambda seed: [s(logits, [_st(SamplingParams(temperature=1.0, seed=seed), tokens=[1] * (3 + i))])[0][0] for i in range(20)]
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_seeded_draw_does_not_depend_on_batch_neighbours():
    torch.manual_seed(1)
    logits = torch.randn(3, 500)
    s = Sampler(frozenset(), seed=123)
    seeded = _st(SamplingParams(temperature=0.9, seed=5))
    alone = s(logits[1:2], [seeded])[0][0]
    mixed = s(logits, [_st(SamplingParams(temperature=1.0)), seeded, _st(SamplingParams(temperature=0))])[0][1]
    assert alone == mixed


def test_top_k_one_is_greedy_and_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[1.0, 2.0, 8.0, 0.5, 7.9]])
    s = Sampler(frozenset())
    for seed in range(20):
        assert s(logits, [_st(SamplingParams(temperature=1.0, top_k=1, seed=seed))])[0] == [2]
        # tokens 2 and 4 hold ~0.99 of the mass: top_p=0.9 keeps only them
        assert s(logits, [_st(SamplingParams(temperature=1.0, top_p=0.9, seed=seed))])[0][0] in (2, 4)


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = Sampler(frozenset())
    seen = {s(logits, [_st(SamplingParams(temperature=1.0, min_p=0.5, seed=i))])[0][0] for i in range(200)}
    assert seen == {0, 1}


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    s = Sampler(frozenset())
    assert s(logits, [_st(SamplingParams(temperature=0), tokens=[5])])[0] == [0]
    assert s(logits, [_st(SamplingParams(temperature=0, repetition_penalty=1.2), tokens=[0])])[0] == [1]


def test_frequency_penalty_counts_output_tokens_only():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    s = Sampler(frozenset())
    in_prompt = _st(SamplingParams(temperature=0, frequency_penalty=1.0), tokens=[0, 0, 0], n_prompt=3)
    in_output = _st(SamplingParams(temperature=0, frequency_penalty=1.0), tokens=[9, 0], n_prompt=1)
    assert s(logits, [in_prompt])[0] == [0]
    assert s(logits, [in_output])[0] == [1]


def test_min_tokens_masks_eos_until_reached():
    logits = torch.tensor([[0.0, 9.0, 1.0]])
    s = Sampler(frozenset({1}))
    assert s(logits, [_st(SamplingParams(temperature=0, min_tokens=2), tokens=[5, 6], n_prompt=1)])[0] == [2]
    assert s(logits, [_st(SamplingParams(temperature=0, min_tokens=2), tokens=[5, 6, 7], n_prompt=1)])[0] == [1]


def test_logprobs_are_of_the_raw_distribution_with_top_k_alternatives():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    _, lps = Sampler(frozenset())(logits, [_st(SamplingParams(temperature=0, logprobs=2))])
    lp = lps[0]
    expected = torch.log_softmax(logits[0], -1)
    assert lp.token_id == 2
    assert math.isclose(lp.logprob, float(expected[2]), rel_tol=1e-6)
    assert [t for t, _ in lp.top] == [2, 1]
