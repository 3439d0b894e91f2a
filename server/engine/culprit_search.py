"""Which request made a step fail: retry the failed step's requests in halves (plain Python).

Owner: the Scheduler. When a step with several requests raises, none of them is blamed yet:
they are preempted (their work is recomputed) and split into two groups. While a group is
being retried, the scheduler runs that group alone; once every member has recomputed as far
as the failed step had taken it (`targets`) and run one step past that, the group is cleared
and the next one runs. (One step past: a fault that needs company, say memory for a large
batch, then still costs one token of progress per search, never a loop.) A
group that fails again is split in turn (its halves go first), so a fault one request triggers
is isolated in about log2(batch) failed steps, and only that request ends with an error.

Invariants: groups are disjoint; a group is never empty; every member has a target. A request
that finishes or is aborted leaves its group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vlmserve.engine.request import Request


class CulpritSearch:
    def __init__(self) -> None:
        self._groups: list[list[str]] = []  # front: the group being retried
        self._targets: dict[str, int] = {}  # req id -> num_computed_tokens the failed step reached

    @property
    def active(self) -> bool:
        return bool(self._groups)

    def current_group(self, requests: Mapping[str, Request]) -> frozenset[str] | None:
        """The group to run alone now, after dropping groups that are done; None: no search."""
        while self._groups:
            group = self._groups[0]
            group[:] = [r for r in group if r in requests and requests[r].num_computed_tokens <= self._targets[r]]
            if group:
                return frozenset(group)
            self._groups.pop(0)
        self._targets.clear()
        return None

    def split(self, suspects: Sequence[Request]) -> None:
        """A step with these requests (more than one) failed: retry each half alone, first."""
        ids = [r.request_id for r in suspects]
        for req in suspects:
            self._targets[req.request_id] = max(self._targets.get(req.request_id, 0), req.num_computed_tokens)
        taken = set(ids)
        self._groups = [[r for r in g if r not in taken] for g in self._groups]
        self._groups = [g for g in self._groups if g]
        half = (len(ids) + 1) // 2
        self._groups[:0] = [ids[:half], ids[half:]]

    def forget(self, req_id: str) -> None:
        """The request ended (a culprit, finished, aborted): it leaves its group."""
        self._targets.pop(req_id, None)
        for group in self._groups:
            if req_id in group:
                group.remove(req_id)
        self._groups = [g for g in self._groups if g]
