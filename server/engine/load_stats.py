"""What the scheduler's queues say about load: pending prefill work by modality, and how long
a newcomer waits for a sequence slot. Pure functions over the scheduler's requests (plain
Python; no torch), called by `Scheduler.get_stats`; the autoscaling estimate
(`vlmserve.autoscale.signals`) is built on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vlmserve.engine.request import Request


@dataclass(frozen=True)
class PendingWork:
    num_tokens: int  # LM prompt tokens (recomputed outputs of preempted requests included) not yet computed
    num_encoder_rows: int  # vision encoder rows still to compute (items not in the encoder cache)
    # Token-equivalents by the modality that causes them: LM tokens at text / image / video
    # positions, plus that modality's encoder rows. text + image + video = tokens + rows.
    text: int
    image: int
    video: int


def pending_work(waiting: Sequence[Request], running: Sequence[Request],
                 is_encoded: Callable[[str], bool]) -> PendingWork:
    """`is_encoded(content_hash)`: the item's encoder output is cached (no rows left to run)."""
    tokens = sum(r.num_tokens for r in waiting) + sum(max(0, r.num_prompt_tokens - r.num_computed_tokens)
                                                      for r in running)
    rows = 0
    media = {"image": 0, "video": 0}
    for request in (*waiting, *running):
        computed = request.num_computed_tokens
        for item in request.mm_items:
            if item.offset + item.length <= computed:
                continue
            work = item.offset + item.length - max(item.offset, computed)  # its LM positions left
            if not is_encoded(item.content_hash):
                rows += item.encoder_rows
                work += item.encoder_rows
            media["video" if item.modality == "video" else "image"] += work
    media_positions = media["image"] + media["video"] - rows
    return PendingWork(tokens, rows, max(0, tokens - media_positions), media["image"], media["video"])


def slot_wait_steps(waiting: Sequence[Request], running: Sequence[Request], max_num_seqs: int) -> int:
    """Steps until a request arriving now (behind every waiting one) gets a slot: an upper bound
    from output budgets (max_tokens). The k-th slot to free is the running request with the
    k-th smallest budget left; past one round of slots, each further round adds the mean
    budget of the waiting requests."""
    need = len(waiting) + 1 - (max_num_seqs - len(running))
    if need <= 0:
        return 0
    left = sorted(max(1, r.sampling_params.max_tokens - r.num_output_tokens) for r in running)
    if not left:
        return 0  # slots are free but blocks are not: that wait is KV, not slots
    budgets = [r.sampling_params.max_tokens for r in waiting]
    cycle = sum(budgets) / len(budgets) if budgets else left[-1]
    rounds, index = divmod(need - 1, len(left))
    return int(left[index] + rounds * cycle)


def slot_cycle_steps(waiting: Sequence[Request], running: Sequence[Request]) -> float:
    """Steps one slot stays taken, on average: the mean output budget of the queued requests."""
    budgets = [r.sampling_params.max_tokens for r in (*running, *waiting)]
    return sum(budgets) / len(budgets) if budgets else 0.0
