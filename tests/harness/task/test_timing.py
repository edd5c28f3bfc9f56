"""harness/task/timing.py: the one timer, calls in rotation (the trial's paired speedup and the bench)."""

import statistics
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.task.timing import quartiles, time_in_rotation


def _recorder(names):
    calls: list[str] = []
    return calls, {n: (lambda n=n: calls.append(n)) for n in names}


def test_two_functions_are_pairs_whose_first_call_alternates():
    calls, fns = _recorder("ab")
    times = time_in_rotation(fns, repeats=4, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert [len(t) for t in times.values()] == [4, 4]


@settings(deadline=None, max_examples=60, derandomize=True)
@given(n=st.integers(1, 5), repeats=st.integers(1, 7), warmup=st.integers(0, 3), start=st.integers(0, 9))
def test_every_round_calls_each_once_and_each_leads_in_turn(n, repeats, warmup, start):
    names = [f"f{i}" for i in range(n)]
    calls, fns = _recorder(names)
    times = time_in_rotation(fns, repeats, warmup, start=start)
    rounds = [calls[i : i + n] for i in range(0, len(calls), n)]
    assert len(rounds) == warmup + repeats
    for r, order in enumerate(rounds):
        assert sorted(order) == names  # each once per round
        assert order[0] == names[(start + r) % n]  # the leader rotates
        assert order == names[names.index(order[0]) :] + names[: names.index(order[0])]
    assert all(len(t) == repeats for t in times.values())


def test_each_time_is_its_own_calls_on_the_clock_given():
    now = [0]
    cost = {"slow": 5, "fast": 1}

    def call(name):
        now[0] += cost[name]

    fns = {n: (lambda n=n: call(n)) for n in cost}
    times = time_in_rotation(fns, repeats=3, warmup=2, clock=lambda: now[0])
    assert times == {"slow": [5, 5, 5], "fast": [1, 1, 1]}


def test_sync_runs_after_every_call_inside_its_time():
    events = []
    clock_now = [0.0]

    def sync():
        events.append("sync")
        clock_now[0] += 2.0

    times = time_in_rotation(
        {"a": lambda: events.append("a")}, repeats=2, warmup=1, clock=lambda: clock_now[0], sync=sync
    )
    assert events == ["a", "sync"] * 3 and times == {"a": [2.0, 2.0]}


def test_real_sleeps_are_told_apart():
    times = time_in_rotation({"slow": lambda: time.sleep(0.02), "fast": lambda: time.sleep(0.005)}, 4)
    assert min(times["slow"]) >= 0.02 and min(times["fast"]) >= 0.005
    assert statistics.median(times["slow"]) > statistics.median(times["fast"]) + 0.008


@pytest.mark.parametrize(
    "fns,repeats,warmup,match",
    [
        ({}, 1, 0, "no functions"),
        ({"a": lambda: None}, 0, 0, "repeats >= 1"),
        ({"a": print}, 1, -1, "warmup"),
    ],
)
def test_bad_arguments_are_named(fns, repeats, warmup, match):
    with pytest.raises(ValueError, match=match):
        time_in_rotation(fns, repeats, warmup)


@settings(deadline=None, max_examples=80, derandomize=True)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=30))
def test_quartiles_are_numpys_linear_percentiles(xs):
    expect = np.percentile(xs, [25, 50, 75])
    np.testing.assert_allclose(quartiles(xs), expect, rtol=1e-9, atol=1e-6)


def test_quartiles_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="no values"):
        quartiles([])
