"""MediaBudget / MediaHold: reserve is checked, settle is not, release drops everything once."""

from __future__ import annotations

import threading

import pytest

from vlmserve.multimodal.budget import (
    DEFAULT_MEMORY_FRACTION,
    MediaBudget,
    MediaMemoryExceeded,
    default_media_memory_bytes,
    machine_memory_bytes,
)


def test_reservations_past_the_limit_are_refused_and_change_nothing():
    budget = MediaBudget(100)
    a, b = budget.hold(), budget.hold()
    a.reserve("0:raw", 60)
    with pytest.raises(MediaMemoryExceeded) as e:
        b.reserve("0:raw", 50)
    assert (e.value.wanted, e.value.held, e.value.limit, e.value.never_fits) == (50, 60, 100, False)
    assert budget.held == 60 and b.total == 0
    b.reserve("0:raw", 40)  # exactly to the limit
    assert budget.held == 100
    with pytest.raises(MediaMemoryExceeded) as e:
        b.reserve("1:raw", 101)
    assert e.value.never_fits  # this request alone needs more than the whole budget


def test_a_key_is_one_count_that_moves_to_the_new_size():
    budget = MediaBudget(100)
    h = budget.hold()
    h.reserve("0:raw", 80)
    h.reserve("0:raw", 30)  # a shrink (Content-Length below the cap)
    assert budget.held == 30
    h.reserve("0:decoded", 70)
    with pytest.raises(MediaMemoryExceeded):
        h.reserve("0:decoded", 71)
    h.settle("0:raw", 0)
    assert budget.held == 70 == h.total


def test_settle_is_never_refused_so_the_next_reservation_is():
    budget = MediaBudget(100)
    h, other = budget.hold(), budget.hold()
    h.reserve("pixels", 50)
    h.settle("pixels", 130)  # the memory exists already: counted, not refused
    assert budget.held == 130
    with pytest.raises(MediaMemoryExceeded):
        other.reserve("0:raw", 1)
    h.release()
    other.reserve("0:raw", 100)
    assert budget.held == 100


def test_release_is_idempotent_and_late_changes_of_a_released_hold_are_ignored():
    budget = MediaBudget(100)
    h = budget.hold()
    h.reserve("0:raw", 40)
    h.release()
    h.release()
    h.settle("0:decoded", 30)  # a decode that finished after its request ended
    h.reserve("0:decoded", 30)
    assert budget.held == 0 and h.total == 0


def test_concurrent_reservations_never_pass_the_limit():
    budget = MediaBudget(1000)
    granted: list[int] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        for i in range(200):
            h = budget.hold()
            try:
                h.reserve("k", 7 + (seed * 31 + i) % 50)
            except MediaMemoryExceeded:
                continue
            with lock:
                granted.append(budget.held)
            assert budget.held <= 1000
            if i % 3:
                h.release()

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert granted and max(granted) <= 1000


def test_negative_sizes_and_empty_budgets_are_errors():
    with pytest.raises(ValueError):
        MediaBudget(0)
    with pytest.raises(ValueError):
        MediaBudget(10).hold().settle("k", -1)


def test_the_default_is_a_fraction_of_the_machines_memory():
    total = machine_memory_bytes()
    assert 0 < total
    assert default_media_memory_bytes() == int(total * DEFAULT_MEMORY_FRACTION)
