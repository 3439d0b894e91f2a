"""The batched sampler against a straightforward per-row reference, for every combination of
temperature, top-k, top-p, min-p, penalties (with prompt tokens), min_tokens and logprobs.

The reference follows the definition in `vlmserve.runner.sampling_ops` literally: dense
penalties from the token list, a full sort of every row, the draw walking the whole
vocabulary in id order with the row's uniform. Seeded rows make every draw comparable.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest
import torch

from vlmserve.engine.sampling_params import GREEDY_EPS, SamplingParams
from vlmserve.runner import sampling_ops as ops
from vlmserve.runner.input_batch import CachedRequestState
from vlmserve.runner.sampler import Sampler

V = 600
EOS = 7


def _state(params: SamplingParams, token_ids: list[int], num_prompt: int, req_id: str = "r") -> CachedRequestState:
    return CachedRequestState(req_id, list(token_ids), num_prompt, [], params, [0], len(token_ids))


def reference_token(logits: torch.Tensor, st: CachedRequestState, eos: set[int]) -> int:
    p = st.sampling_params
    x = logits.float().clone()
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    outputs = st.token_ids[st.num_prompt_tokens :]
    if p.min_tokens and len(outputs) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else eos):
            if t < V:
                x[t] = -math.inf
    if p.repetition_penalty != 1.0:
        for t in set(st.token_ids):
            if t < V:
                x[t] = x[t] / f32(p.repetition_penalty) if x[t] > 0 else x[t] * f32(p.repetition_penalty)
    for t, c in Counter(outputs).items():
        x[t] = x[t] - f32(p.frequency_penalty) * c - f32(p.presence_penalty)
    if p.temperature < GREEDY_EPS:
        return int(x.argmax())
    xs = x / f32(p.temperature)
    vals, ids = xs.sort(descending=True)
    w = (vals - vals[0]).exp()
    if 0 < p.top_k < V:
        w[p.top_k :] = 0
    total = w.sum()
    before = w.cumsum(0) - w
    drop = (before >= f32(p.top_p) * total) & (p.top_p < 1) | (w < f32(p.min_p))
    drop[0] = False  # the top token always stays
    w[drop] = 0
    w_by_id = torch.zeros(V).scatter_(0, ids, w)
    cum = w_by_id.cumsum(0)
    u = ops.seeded_uniform(p.seed, len(outputs))
    return int((cum > torch.tensor(u, dtype=torch.float32) * cum[-1]).nonzero()[0])


def nucleus_size(logits: torch.Tensor, temperature: float, top_p: float) -> int:
    w = (logits / temperature).softmax(0).sort(descending=True).values
    return int(((w.cumsum(0) - w) < top_p).sum())


GRID = list(itertools.product(
    [0.0, 0.7, 2.5],  # temperature
    [0, 1, 5, 50],  # top_k
    [1.0, 0.95, 0.3, 0.001],  # top_p
    [0.0, 0.2],  # min_p
    [(1.0, 0.0, 0.0), (1.3, 0.0, 0.0), (1.0, 0.5, 0.7), (1.2, -0.4, 1.1)],  # repetition, presence, frequency
    [None, 3],  # logprobs
))


def _grid_batch(seed: int = 0):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    logits = torch.randn(len(GRID), V) * 2.0
    states = []
    for i, (t, k, p, mp, (rep, pres, freq), lp) in enumerate(GRID):
        n_prompt = rng.randint(3, 40)
        tokens = [rng.randrange(V) for _ in range(n_prompt)] + [rng.randrange(20) for _ in range(rng.randint(0, 12))]
        params = SamplingParams(
            temperature=t, top_k=k, top_p=p, min_p=mp, repetition_penalty=rep, presence_penalty=pres,
            frequency_penalty=freq, logprobs=lp, seed=rng.randrange(2**63), min_tokens=rng.choice([0, 0, 20]),
        )
        states.append(_state(params, tokens, n_prompt, f"r{i}"))
    return logits, states


def test_every_parameter_combination_matches_the_reference() -> None:
    logits, states = _grid_batch()
    tokens, logprobs = Sampler(frozenset({EOS}))(logits, states)
    expected = [reference_token(logits[i], st, {EOS}) for i, st in enumerate(states)]
    mismatches = [(i, GRID[i], tokens[i], expected[i]) for i in range(len(GRID)) if tokens[i] != expected[i]]
    assert not mismatches, mismatches[:5]
    # The grid reaches every path of the top-p code: the top token alone, a nucleus inside
    # the 256 candidates, and one larger than them (a full sort).
    sizes = {nucleus_size(logits[i], t, p) for i, (t, k, p, *_rest) in enumerate(GRID) if t > 0 and k == 0 and p < 1}
    assert min(sizes) == 1 and any(1 < s <= ops.NUCLEUS_CANDIDATES for s in sizes)
    assert max(sizes) > ops.NUCLEUS_CANDIDATES
    raw = logits.log_softmax(-1)
    for i, lp in enumerate(logprobs):
        if GRID[i][-1] is None:
            assert lp is None
            continue
        assert lp.token_id == tokens[i]
        assert lp.logprob == pytest.approx(float(raw[i, tokens[i]]), abs=1e-5)
        top = raw[i].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_inplace_gives_the_same_tokens_and_the_default_leaves_logits_alone() -> None:
    logits, states = _grid_batch(seed=3)
    before = logits.clone()
    a, _ = Sampler(frozenset({EOS}))(logits, states)
    assert torch.equal(logits, before)
    _, fresh = _grid_batch(seed=3)
    b, _ = Sampler(frozenset({EOS}))(logits.clone(), fresh, inplace=True)
    assert a == b


def test_seeded_rows_do_not_depend_on_batch_composition_or_order() -> None:
    logits, states = _grid_batch(seed=1)
    full, _ = Sampler(frozenset({EOS}), seed=5)(logits, states)
    rng = random.Random(2)
    for _ in range(3):
        rows = rng.sample(range(len(GRID)), 40)
        _, fresh = _grid_batch(seed=1)
        sub, _ = Sampler(frozenset({EOS}), seed=rng.randrange(100))(logits[rows], [fresh[r] for r in rows])
        assert sub == [full[r] for r in rows]


def test_incremental_penalty_state_equals_a_rebuild_each_step() -> None:
    """A request decoding 12 steps in a batch (its penalty state updated from the tokens the
    runner appends) samples what a fresh state per step (rebuilt from the token ids, as after
    a preemption) samples."""
    torch.manual_seed(4)
    params = [
        SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.5, presence_penalty=0.8, frequency_penalty=0.6, seed=11),
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
        SamplingParams(temperature=1.0, top_p=0.9, frequency_penalty=1.5, seed=12),
    ]
    prompt = [3, 9, 9, 4, 650, 12]  # 650 >= V: an id outside the LM head (Mllama's image token)
    steps = [torch.randn(len(params), V) for _ in range(12)]
    live = [_state(p, prompt, len(prompt), f"l{i}") for i, p in enumerate(params)]
    sampler = Sampler(frozenset({EOS}))
    for logits in steps:
        tokens, _ = sampler(logits, live)
        rebuilt, _ = Sampler(frozenset({EOS}))(logits, [_state(p, st.token_ids, len(prompt)) for p, st in zip(params, live)])
        assert tokens == rebuilt
        assert tokens == [reference_token(logits[i], st, {EOS}) if st.sampling_params.seed is not None
                          else int(tokens[i]) for i, st in enumerate(live)]
        for st, tok in zip(live, tokens):
            st.token_ids.append(tok)
    # The greedy row with repetition 2.0 must have been steered by its own outputs.
    assert len(set(live[1].token_ids[len(prompt):])) > 1
    for st in live:
        sampler.release(st)


def test_released_slots_are_reused_without_stale_history() -> None:
    torch.manual_seed(6)
    sampler = Sampler(frozenset())
    p = SamplingParams(temperature=0.0, repetition_penalty=3.0)
    long = _state(p, list(range(50, 90)), 40)
    sampler(torch.randn(1, V), [long])
    sampler.release(long)
    short = _state(p, [1, 2], 2)
    logits = torch.randn(1, V)
    assert sampler(logits, [short])[0] == [reference_token(logits[0], short, set())]


@pytest.mark.parametrize("seeded", [False, True])
def test_draws_follow_the_filtered_distribution(seeded: bool) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]]).repeat(4000, 1)
    states = [_state(SamplingParams(temperature=1.0, top_k=4, seed=i if seeded else None), [1, 2], 2)
              for i in range(4000)]
    tokens, _ = Sampler(frozenset(), seed=9)(logits, states)
    probs = torch.tensor([2.0, 1.0, 0.5, -math.inf, 0.0]).softmax(0)
    freq = torch.bincount(torch.tensor(tokens), minlength=5).double() / 4000
    assert freq[3] == 0
    assert torch.allclose(freq, probs.double(), atol=0.03)


def test_seeded_uniforms_are_uniform_and_position_dependent() -> None:
    us = [ops.seeded_uniform(seed, pos) for seed in range(200) for pos in range(20)]
    assert all(0 <= u < 1 for u in us)
    assert abs(sum(us) / len(us) - 0.5) < 0.02
    assert len(set(us)) > 0.99 * len(us)
    assert ops.seeded_uniform(-1, 3) == ops.seeded_uniform(2**64 - 1, 3)


def test_rows_that_reduce_to_greedy_never_sort_or_draw(monkeypatch) -> None:
    """Qwen2-VL's published defaults (top_k 1), a top_p below 1/V and a top_p the top token
    alone reaches all take the argmax: no sort, no topk, no draw."""
    torch.manual_seed(8)
    logits = torch.randn(3, V)
    logits[2, 17] = 40.0  # this row's top token holds nearly all the mass
    params = [
        SamplingParams(temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05, seed=1),
        SamplingParams(temperature=1.0, top_p=1.0 / (2 * V), seed=5),
        SamplingParams(temperature=1.0, top_p=0.9, seed=2),
    ]
    states = [_state(p, [1, 2, 3, 1], 3) for p in params]
    expected = [reference_token(logits[i], st, set()) for i, st in enumerate(states)]

    def forbidden(*_a, **_k):
        raise AssertionError("a greedy-equivalent row took a sampling path")

    for name in ("draw_candidates", "draw_sorted_full", "draw_full"):
        monkeypatch.setattr(ops, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "sort", forbidden)
    monkeypatch.setattr(torch.Tensor, "topk", forbidden)
    tokens, _ = Sampler(frozenset())(logits, states)
    assert tokens == expected
    assert tokens[2] == 17


def test_repetition_penalty_matches_transformers_logits_processor() -> None:
    """The HF/CTRL repetition penalty over prompt and output ids, as transformers applies it."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(10)
    logits = torch.randn(2, V) * 3
    token_ids = [[5, 9, 9, 300, 12, 5], [0, 1, 2, 599]]
    states = [_state(SamplingParams(temperature=0.0, repetition_penalty=1.7), ids, 3) for ids in token_ids]
    sampler = Sampler(frozenset())
    ours = logits.clone()
    sampler._apply_penalties(ours, [0, 1], [sampler._info(st, V) for st in states], states)
    hf = RepetitionPenaltyLogitsProcessor(1.7)
    for i, ids in enumerate(token_ids):
        expected = hf(torch.tensor([ids]), logits[i : i + 1].clone())[0]
        assert torch.allclose(ours[i], expected, rtol=1e-6, atol=0)
