"""Logits [B, V] of the sampling rows of a step → one token per row (+ logprobs).

Order: logprobs of the raw model output (as vLLM reports them), then min_tokens masking,
penalties, then per row either argmax (greedy) or temperature → top-k → top-p → min-p →
a draw. A seeded request draws from a generator seeded by (seed, output index), so its
tokens do not depend on what else is in the batch or on preemption.
"""

from __future__ import annotations

import torch

from vlmserve.engine.outputs import TokenLogprob
from vlmserve.runner.input_batch import CachedRequestState

_MASK = float("-inf")


def _seeded_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 0x9E3779B1 + step * 0x85EBCA77 + 0x165667B1) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def apply_penalties(logits: torch.Tensor, states: list[CachedRequestState]) -> None:
    """In place. Repetition penalty (HF/CTRL style) over prompt and output tokens; presence
    and frequency penalties (OpenAI style) over output tokens only."""
    for row, st in enumerate(states):
        p = st.sampling_params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(st.token_ids)), dtype=torch.long, device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and len(st.token_ids) > st.num_prompt_tokens:
            out = torch.tensor(st.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1])[: logits.shape[1]].to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (already temperature-scaled) with the tokens outside top-k / top-p /
    min-p set to -inf. top_k <= 0 disables; top_p 1 disables; min_p 0 disables."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab).unsqueeze(1)
    remove = ranks >= k
    sorted_logits = sorted_logits.masked_fill(remove, _MASK)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the mass before it already reaches top_p (the top token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    remove |= probs < (min_p.unsqueeze(1) * probs[:, :1])
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, _MASK)
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int], seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __call__(
        self, logits: torch.Tensor, states: list[CachedRequestState]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        logits = logits.float()
        logprobs: list[TokenLogprob | None] = [None] * len(states)
        want_logprobs = [i for i, st in enumerate(states) if st.sampling_params.logprobs is not None]
        raw_logprobs = logits[want_logprobs].log_softmax(dim=-1) if want_logprobs else None

        logits = logits.clone()
        for row, st in enumerate(states):
            p = st.sampling_params
            if p.min_tokens and len(st.token_ids) - st.num_prompt_tokens < p.min_tokens:
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                if stops:
                    logits[row, sorted(t for t in stops if t < logits.shape[1])] = _MASK
        apply_penalties(logits, states)

        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, st in enumerate(states) if not st.sampling_params.greedy]
        if random_rows:
            tokens[random_rows] = self._sample(logits[random_rows], [states[i] for i in random_rows])

        token_list = tokens.tolist()
        if raw_logprobs is not None:
            for j, row in enumerate(want_logprobs):
                logprobs[row] = self._logprobs(raw_logprobs[j], token_list[row], states[row].sampling_params.logprobs)
        return token_list, logprobs

    def _sample(self, logits: torch.Tensor, states: list[CachedRequestState]) -> torch.Tensor:
        dev = logits.device
        temp = torch.tensor([st.sampling_params.temperature for st in states], device=dev)
        top_k = torch.tensor([st.sampling_params.top_k for st in states], device=dev)
        top_p = torch.tensor([st.sampling_params.top_p for st in states], device=dev)
        min_p = torch.tensor([st.sampling_params.min_p for st in states], device=dev)
        logits = _filter(logits / temp.unsqueeze(1), top_k, top_p, min_p)
        probs = logits.softmax(dim=-1)
        # A draw from probs: argmax of probs / Exp(1) noise (the exponential race).
        noise = torch.empty_like(probs)
        for i, st in enumerate(states):
            p = st.sampling_params
            gen = self.generator if p.seed is None else _seeded_generator(p.seed, len(st.output_token_ids), dev)
            noise[i].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(row: torch.Tensor, token: int, k: int) -> TokenLogprob:
        top: list[tuple[int, float]] = []
        if k > 0:
            vals, idx = row.topk(k)
            top = list(zip(idx.tolist(), vals.tolist()))
        return TokenLogprob(token_id=token, logprob=float(row[token]), top=top)
