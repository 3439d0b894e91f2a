"""Logits [B, V] of the sampling rows of a step → one token per row (+ logprobs).

Order (as vLLM): logprobs of the raw model output, then min_tokens masking, penalties, then
per row either argmax or temperature → top-k → top-p → min-p → a draw (`sampling_ops`
defines it). Work is proportional to what the rows ask for:
- rows whose parameters reduce to greedy (temperature ~0, top_k == 1, top_p below 1/V; and,
  found per step, top_p at most the top token's probability) take the argmax; a batch of
  only such rows does one argmax and nothing else;
- top-k rows draw among one `topk` of the batch's largest k; top-p rows without top-k look
  for their nucleus in the top 256 first and sort the whole row only when it is larger;
  min-p alone needs no sort;
- penalties read device-resident per-request state updated incrementally (`penalties`);
- every sampled row takes one uniform: one generator call for the unseeded rows, and a pure
  function of (seed, output position) for the seeded ones, so seeded rows are reproducible
  whatever else is in the batch and across preemption;
- logprobs: one log_softmax, one topk and one host copy for the whole batch.
Per-request constants (which group a row is in, its stop ids, ...) are computed once, when
the request first samples, and kept on its `CachedRequestState.sampler_state`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmserve.engine.outputs import TokenLogprob
from vlmserve.engine.sampling_params import GREEDY_EPS
from vlmserve.runner import sampling_ops as ops
from vlmserve.runner.input_batch import CachedRequestState
from vlmserve.runner.penalties import PenaltySlot, PenaltyState

_MASK = float("-inf")


@dataclass
class _RowInfo:
    """A request's sampling constants at vocabulary size `vocab` (built once)."""

    vocab: int
    greedy: bool
    temperature: float
    top_k: int  # 0: off (disabled, or >= vocab)
    top_p: float
    min_p: float
    penalties: tuple[float, float, float] | None  # (repetition, presence, frequency); None: none
    seed: int | None
    min_tokens: int
    stop_ids: list[int]  # masked while fewer than min_tokens outputs (ids < vocab)
    logprobs: int | None
    penalty_slot: PenaltySlot | None = None


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int], seed: int = 0, device: torch.device | str = "cpu") -> None:
        self.eos_token_ids = sorted(eos_token_ids)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._penalties: PenaltyState | None = None

    # ---- per-request state -----------------------------------------------------------------

    def _info(self, st: CachedRequestState, vocab: int) -> _RowInfo:
        info = st.sampler_state
        if info is not None and info.vocab == vocab:
            return info
        p = st.sampling_params
        top_k = p.top_k if 0 < p.top_k < vocab else 0
        # top_p keeps the smallest set whose mass reaches it; the top token alone has mass
        # >= 1/V, so a smaller top_p keeps only it (0.999: margin for rounding).
        greedy = p.temperature < GREEDY_EPS or top_k == 1 or p.top_p * vocab < 0.999
        penalties = None
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            penalties = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
        info = _RowInfo(
            vocab=vocab, greedy=greedy, temperature=p.temperature, top_k=top_k, top_p=p.top_p, min_p=p.min_p,
            penalties=penalties, seed=p.seed, min_tokens=p.min_tokens,
            stop_ids=sorted(t for t in stops if t < vocab), logprobs=p.logprobs,
        )
        if st.sampler_state is not None:
            self.release(st)
        st.sampler_state = info
        return info

    def release(self, st: CachedRequestState) -> None:
        """The runner dropped the request (finished or preempted): free its device state."""
        info = st.sampler_state
        if info is not None and info.penalty_slot is not None and self._penalties is not None:
            self._penalties.release(info.penalty_slot)
            info.penalty_slot = None

    # ---- one step --------------------------------------------------------------------------

    def __call__(
        self, logits: torch.Tensor, states: list[CachedRequestState], *, inplace: bool = False
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """`inplace`: the caller gives `logits` up (the runner's are a temporary), so masking
        and penalties need not copy them."""
        B, V = logits.shape
        infos = [self._info(st, V) for st in states]
        x = logits.float()
        lp_rows = [i for i, r in enumerate(infos) if r.logprobs is not None]
        raw_logprobs = x[lp_rows].log_softmax(dim=-1) if lp_rows else None  # a copy: before any change

        masked = [(i, r) for i, (r, st) in enumerate(zip(infos, states))
                  if r.min_tokens and r.stop_ids and len(st.token_ids) - st.num_prompt_tokens < r.min_tokens]
        penalized = [i for i, r in enumerate(infos) if r.penalties is not None]
        owned = inplace or x.data_ptr() != logits.data_ptr()  # may x be written?
        if (masked or penalized) and not owned:
            x, owned = x.clone(), True
        if masked:
            rows = [i for i, r in masked for _ in r.stop_ids]
            cols = [t for _, r in masked for t in r.stop_ids]
            x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = _MASK
        if penalized:
            self._apply_penalties(x, penalized, infos, states)

        sampled = [i for i, r in enumerate(infos) if not r.greedy]
        if not sampled:
            tokens = x.argmax(dim=-1)
        elif len(sampled) == B and owned:
            tokens = self._sample(x, infos, states)  # scales x in place: no row copy
        else:
            tokens = x.argmax(dim=-1) if len(sampled) < B else torch.empty(B, dtype=torch.long, device=x.device)
            idx = torch.tensor(sampled, device=x.device)
            tokens[idx] = self._sample(x.index_select(0, idx), [infos[i] for i in sampled],
                                       [states[i] for i in sampled])
        token_list = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * B
        if raw_logprobs is not None:
            ks = [infos[i].logprobs for i in lp_rows]
            for row, lp in zip(lp_rows, self._logprobs(raw_logprobs, tokens[lp_rows], ks)):
                logprobs[row] = lp
        return token_list, logprobs

    def _apply_penalties(
        self, x: torch.Tensor, rows: list[int], infos: list[_RowInfo], states: list[CachedRequestState]
    ) -> None:
        if self._penalties is None or self._penalties.vocab_size != x.shape[1]:
            self._penalties = PenaltyState(x.shape[1], self.device)
        pen = self._penalties
        entries = []
        for i in rows:
            info, st = infos[i], states[i]
            with_counts = bool(info.penalties[1] or info.penalties[2])
            if info.penalty_slot is not None and len(st.token_ids) < info.penalty_slot.num_seen:
                pen.release(info.penalty_slot)  # the token list was replaced: start over
                info.penalty_slot = None
            if info.penalty_slot is None:
                info.penalty_slot = pen.build(st.token_ids, st.num_prompt_tokens, with_counts=with_counts)
            entries.append(info.penalty_slot)
        pen.sync(entries, [states[i].token_ids for i in rows])
        params = torch.tensor([infos[i].penalties for i in rows], dtype=x.dtype, device=x.device)
        pen.apply(x, rows, entries, params)

    def _uniforms(self, infos: list[_RowInfo], states: list[CachedRequestState]) -> torch.Tensor:
        """One uniform per row: the generator for unseeded rows (one call), a function of
        (seed, output position) for seeded ones."""
        u = torch.rand(len(infos), generator=self.generator, device=self.device)
        seeded = [i for i, r in enumerate(infos) if r.seed is not None]
        if seeded:
            vals = [ops.seeded_uniform(infos[i].seed, len(states[i].token_ids) - states[i].num_prompt_tokens)
                    for i in seeded]
            u[torch.tensor(seeded, device=self.device)] = torch.tensor(vals, device=self.device)
        return u

    def _sample(self, x: torch.Tensor, infos: list[_RowInfo], states: list[CachedRequestState]) -> torch.Tensor:
        """x [R, V]: the non-greedy rows, ours to scale in place → tokens int64 [R]."""
        dev = x.device
        R = x.shape[0]
        p = torch.tensor([[r.temperature, r.top_k, r.top_p, r.min_p] for r in infos], dtype=torch.float64, device=dev)
        temp, top_k, top_p, min_p = p[:, 0].to(x.dtype), p[:, 1].long(), p[:, 2].to(x.dtype), p[:, 3].to(x.dtype)
        x.div_(temp.unsqueeze(1))
        u = self._uniforms(infos, states)
        tokens = torch.empty(R, dtype=torch.long, device=dev)

        k_rows = [i for i, r in enumerate(infos) if r.top_k]
        p_rows = [i for i, r in enumerate(infos) if not r.top_k and r.top_p < 1]
        f_rows = [i for i, r in enumerate(infos) if not r.top_k and r.top_p >= 1]
        if k_rows:
            ki = torch.tensor(k_rows, device=dev)
            xk = x if len(k_rows) == R else x.index_select(0, ki)
            vals, ids = xk.topk(max(infos[i].top_k for i in k_rows), dim=-1)
            tokens[ki] = ops.draw_candidates(vals, ids, top_k[ki], top_p[ki], min_p[ki], u[ki])
        if f_rows:
            fi = torch.tensor(f_rows, device=dev)
            tokens[fi] = ops.draw_full(x if len(f_rows) == R else x.index_select(0, fi), min_p[fi], u[fi])
        if p_rows:
            self._sample_top_p(x, torch.tensor(p_rows, device=dev), top_p, min_p, u, tokens)
        return tokens

    @staticmethod
    def _sample_top_p(
        x: torch.Tensor, pi: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor,
        tokens: torch.Tensor,
    ) -> None:
        """Rows with top_p and no top_k: greedy when the top token alone reaches top_p, else
        the nucleus from a topk of NUCLEUS_CANDIDATES when it fits, else one full sort."""
        xp = x if pi.shape[0] == x.shape[0] else x.index_select(0, pi)
        top, arg = xp.max(dim=-1)
        total = (xp - top.unsqueeze(1)).exp_().sum(dim=-1)  # mass in units of the top weight (1)
        tp, mp = top_p[pi], min_p[pi]
        alone = tp * total <= 1
        tokens[pi[alone]] = arg[alone]
        rest = (~alone).nonzero().squeeze(1)
        if rest.numel() == 0:
            return
        xr, tp, mp, total, ur = xp[rest], tp[rest], mp[rest], total[rest], u[pi[rest]]
        vals, ids = xr.topk(min(ops.NUCLEUS_CANDIDATES, xr.shape[1]), dim=-1)
        fits = (vals - top[rest].unsqueeze(1)).exp().sum(dim=-1) >= tp * total
        out = torch.empty(rest.shape[0], dtype=torch.long, device=x.device)
        f = fits.nonzero().squeeze(1)
        if f.numel():
            no_k = torch.zeros(f.shape[0], dtype=torch.long, device=x.device)
            out[f] = ops.draw_candidates(vals[f], ids[f], no_k, tp[f], mp[f], ur[f], total[f])
        s = (~fits).nonzero().squeeze(1)
        if s.numel():
            out[s] = ops.draw_sorted_full(xr[s], tp[s], mp[s], ur[s], total[s])
        tokens[pi[rest]] = out

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
        """raw [W, V] log-probabilities, tokens [W] → one topk and one host copy for all rows."""
        k = max(ks)
        dtype = raw.dtype if raw.shape[1] <= 2**24 else torch.float64  # ids exact in the packed copy
        parts = [tokens.unsqueeze(1).to(dtype), raw.gather(1, tokens.unsqueeze(1)).to(dtype)]
        if k > 0:
            vals, idx = raw.topk(k, dim=-1)
            parts += [vals.to(dtype), idx.to(dtype)]
        host = torch.cat(parts, dim=1).tolist()
        out = []
        for row, kr in zip(host, ks):
            top = [(int(row[2 + k + j]), row[2 + j]) for j in range(kr)]
            out.append(TokenLogprob(token_id=int(row[0]), logprob=row[1], top=top))
        return out
