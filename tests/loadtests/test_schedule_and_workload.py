"""Arrival profiles and request bodies: the Poisson rates are what the scenario says, pooled
media repeat byte for byte while unique ones never do, and loadtests is not in the wheel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.schedule import Profile, arrival_times
from loadtests.workload import SCENARIOS, Workload, WorkloadOptions

REPO = Path(__file__).resolve().parents[2]


def test_spike_rate_is_factor_times_base_inside_the_window():
    p = Profile("spike", rate=20.0, duration=60.0, spike_factor=5.0, spike_start=20.0, spike_length=10.0)
    times = arrival_times(p, seed=1)
    inside = sum(20.0 <= t < 30.0 for t in times) / 10.0
    outside = sum(not (20.0 <= t < 30.0) for t in times) / 50.0
    assert inside == pytest.approx(100.0, rel=0.1) and outside == pytest.approx(20.0, rel=0.1)
    assert times == sorted(times) and times == arrival_times(p, seed=1) != arrival_times(p, seed=2)


def test_ramp_rate_grows_linearly():
    p = Profile("ramp", rate=10.0, duration=40.0, ramp_to=90.0)
    times = arrival_times(p, seed=0)
    first, last = sum(t < 10 for t in times) / 10, sum(t >= 30 for t in times) / 10
    assert first == pytest.approx(20.0, rel=0.15) and last == pytest.approx(80.0, rel=0.1)


def _image_urls(body) -> list[str]:
    return [p["image_url"]["url"] for m in body["messages"] if isinstance(m["content"], list)
            for p in m["content"] if p["type"] == "image_url"]


def test_pooled_media_repeat_and_unique_media_differ():
    w = Workload("image-heavy", WorkloadOptions(model="m", image_reuse=0.5, seed=0))
    reqs = [w.build(i) for i in range(40)]
    hits = [_image_urls(r.body)[0] for r in reqs if r.cache == "hit"]
    misses = [_image_urls(r.body)[0] for r in reqs if r.cache == "miss"]
    assert hits and misses
    assert len(set(hits)) < len(hits)  # a pool of 4 per size
    assert len(set(misses)) == len(misses) and not set(misses) & set(hits)
    assert {r.kind for r in reqs} == {"image:224", "image:720p", "image:1080p"}


def test_multi_turn_sessions_repeat_their_image_and_grow():
    w = Workload("multi-turn", WorkloadOptions(model="m", turns=3))
    reqs = [w.build(i) for i in range(6)]
    assert [r.cache for r in reqs] == ["miss", "hit", "hit"] * 2
    assert _image_urls(reqs[0].body) == _image_urls(reqs[2].body) != _image_urls(reqs[3].body)
    assert [len(r.body["messages"]) for r in reqs[:3]] == [1, 3, 5]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_builds_streaming_bodies_with_usage(scenario):
    r = Workload(scenario, WorkloadOptions(model="m")).build(1)
    assert r.body["stream"] is True and r.body["stream_options"] == {"include_usage": True}
    json.dumps(r.body)
    assert bool(r.media) == (scenario != "text-only")


def test_loadtests_is_not_packaged_in_the_wheel():
    import runpy
    import setuptools

    captured = {}
    orig = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        runpy.run_path(str(REPO / "setup.py"))
    finally:
        setuptools.setup = orig
    assert captured["packages"] and all(p == "vlmserve" or p.startswith("vlmserve.") for p in captured["packages"])
