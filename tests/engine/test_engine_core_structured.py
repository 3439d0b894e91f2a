"""A constrained request reaching an engine without a grammar runtime (tensor parallelism: the
workers keep no matcher state) is refused at admission, naming the flag, and nothing is queued."""

from __future__ import annotations

import dataclasses

import pytest

from tests.engine.fake_runner import FakeRunner
from tests.engine.test_scheduler import make_request, make_scheduler
from vlmserve.engine.engine_core import EngineCore
from vlmserve.engine.structured_spec import StructuredSpec


def test_constrained_request_without_a_grammar_runtime_is_refused_before_it_queues() -> None:
    sched = make_scheduler()
    runner = FakeRunner(sched)
    runner.grammar = None
    core = EngineCore(sched, runner)
    request = make_request("a", 8)
    request.sampling_params = dataclasses.replace(request.sampling_params, structured=StructuredSpec("regex", "a+"))
    with pytest.raises(ValueError, match="--tensor-parallel-size"):
        core.add_request(request)
    assert not sched.has_unfinished_requests()
    core.add_request(make_request("b", 8))  # unconstrained requests are served as before
    assert sched.has_unfinished_requests()
