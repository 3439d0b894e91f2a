"""The sampler's tensor operations and the definition of a draw (no request state here).

A draw, for one row of temperature-scaled logits `x` [V] and a uniform `u` in [0, 1):
1. weights `w = exp(x - max(x))` (the top token has weight exactly 1);
2. top-k: only the k highest weights stay (top_k <= 0 or >= V: all);
3. top-p: in descending order, a token goes when the weight before it already reaches
   `top_p * total` (total: the sum of what top-k kept; the top token always stays);
4. min-p: a token goes when its weight is below `min_p` (its probability below min_p times
   the top probability);
5. the token is the first one, in token-id order, whose cumulative weight exceeds `u *
   cumulative total` (inverse-CDF sampling).

Because the draw walks the kept tokens in id order and every excluded token adds an exact
0.0 to the running sum, a draw restricted to candidates (top-k, or a nucleus found inside
the top 256) picks the same token as the same draw over the whole vocabulary; only the
knife-edge cases where float rounding of a sum flips a comparison can differ.

`u` for a seeded request is a pure function of (seed, output position) (`seeded_uniform`,
splitmix64), so its tokens depend neither on its batch neighbours nor on preemption.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
# A top_p row whose nucleus fits in this many tokens is drawn from a topk of them instead
# of a sort of the whole vocabulary.
NUCLEUS_CANDIDATES = 256


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def seeded_uniform(seed: int, position: int) -> float:
    """A uniform in [0, 1) from (any 64-bit seed, output position): 24 random bits, exactly
    representable in float32."""
    z = _splitmix64(_splitmix64(seed & _MASK64) ^ position)
    return (z >> 40) / float(1 << 24)


def draw_in_id_order(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """w [R, C] >= 0 (0: excluded), columns in ascending token-id order; u [R] → int64 [R]
    column of the first cumulative weight above u * total."""
    cum = w.cumsum(dim=-1)
    target = (u.to(cum.dtype) * cum[:, -1]).unsqueeze(1)
    return torch.searchsorted(cum, target, right=True).squeeze(1).clamp_(max=w.shape[1] - 1)


def filter_sorted_weights(
    w: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, total: torch.Tensor | None
) -> torch.Tensor:
    """w [R, C] in descending order with w[:, 0] == 1 → w with the excluded tokens at 0.
    top_k [R] int64 (<= 0: off), top_p / min_p [R] float; `total` [R]: the mass top-p is
    relative to (None: the sum of what top-k keeps, i.e. the candidates are all there is)."""
    ranks = torch.arange(w.shape[1], device=w.device)
    k = torch.where(top_k > 0, top_k, w.shape[1]).unsqueeze(1)
    w = w.masked_fill(ranks >= k, 0.0)
    if total is None:
        total = w.sum(dim=-1)
    before = w.cumsum(dim=-1) - w
    drop = (before >= (top_p * total).unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    drop |= w < min_p.unsqueeze(1)
    drop[:, 0] = False
    return w.masked_fill(drop, 0.0)


def draw_candidates(
    vals: torch.Tensor, ids: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
    u: torch.Tensor, total: torch.Tensor | None = None,
) -> torch.Tensor:
    """vals / ids [R, C]: the C highest scaled logits of each row, descending, and their token
    ids (from `topk`) → the drawn token ids [R]. `total`: as in `filter_sorted_weights`, in
    the units of exp(x - row max)."""
    w = filter_sorted_weights((vals - vals[:, :1]).exp(), top_k, top_p, min_p, total)
    ids_by_id, order = ids.sort(dim=-1)
    col = draw_in_id_order(w.gather(1, order), u)
    return ids_by_id.gather(1, col.unsqueeze(1)).squeeze(1)


def draw_sorted_full(
    x: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor, total: torch.Tensor
) -> torch.Tensor:
    """Rows whose nucleus is too large for the candidate path: one full sort per row."""
    vals, ids = x.sort(dim=-1, descending=True)
    no_k = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    w = filter_sorted_weights((vals - vals[:, :1]).exp(), no_k, top_p, min_p, total)
    return draw_in_id_order(torch.zeros_like(w).scatter_(1, ids, w), u)


def draw_full(x: torch.Tensor, min_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows without top-k / top-p: no sort, min-p is elementwise."""
    w = (x - x.amax(dim=-1, keepdim=True)).exp_()
    if bool((min_p > 0).any()):
        w.masked_fill_(w < min_p.unsqueeze(1), 0.0)
    return draw_in_id_order(w, u)
