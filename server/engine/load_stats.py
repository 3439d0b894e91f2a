"""How long a newcomer waits for a sequence slot, from the scheduler's running requests (at
most max_num_seqs of them) and the waiting queue's counters (`pending_work.PendingWork`, which
also splits the pending prefill work by modality). Plain Python, no torch; called by
`Scheduler.get_stats`, and the autoscaling estimate (`vlmserve.autoscale.signals`) is built on
them. Nothing here walks the waiting queue: a step's cost must not grow with it.
"""

from __future__ import annotations

from collections.abc import Sequence

from vlmserve.engine.request import Request


def slot_wait_steps(num_waiting: int, waiting_budget: int, running: Sequence[Request], max_num_seqs: int) -> int:
    """Steps until a request arriving now (behind every waiting one) gets a slot: an upper bound
    from output budgets (max_tokens). The k-th slot to free is the running request with the
    k-th smallest budget left; past one round of slots, each further round adds the mean
    budget of the waiting requests."""
    need = num_waiting + 1 - (max_num_seqs - len(running))
    if need <= 0:
        return 0
    left = sorted(max(1, r.sampling_params.max_tokens - r.num_output_tokens) for r in running)
    if not left:
        return 0  # slots are free but blocks are not: that wait is KV, not slots
    cycle = waiting_budget / num_waiting if num_waiting else left[-1]
    rounds, index = divmod(need - 1, len(left))
    return int(left[index] + rounds * cycle)


def slot_cycle_steps(total_budget: int, num_requests: int) -> float:
    """Steps one slot stays taken, on average: the mean output budget of the queued requests."""
    return total_budget / num_requests if num_requests else 0.0
