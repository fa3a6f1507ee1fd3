from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxcomp import search


def _counting(threshold: float):
    calls: list[float] = []

    def pred(x: float) -> bool:
        calls.append(x)
        return x >= threshold

    return pred, calls


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 500), data=st.data())
def test_bracket_finds_the_first_true_in_log_steps(n, data):
    first = data.draw(st.integers(1, n))
    pred, calls = _counting(first)
    lo, hi = search.bracket(pred, 0, n)
    assert (lo, hi) == (first - 1, first)
    assert len(calls) <= math.ceil(math.log2(n)) + 1
    assert 0 not in calls and n not in calls  # the ends are known, not measured


def test_bracket_stops_after_max_steps():
    pred, calls = _counting(37)
    lo, hi = search.bracket(pred, 0, 100, max_steps=2)
    assert len(calls) == 2 and lo < 37 <= hi


def test_last_within_tries_the_limit_first():
    calls = []

    def within(i: int) -> bool:
        calls.append(i)
        return i <= 12

    assert search.last_within(within, 40) == 12
    assert calls[0] == 40
    calls.clear()
    assert search.last_within(within, 10) == 10 and calls == [10]


@pytest.mark.parametrize(("first", "count"), [(1, 20), (3, 20), (17, 20), (20, 20), (5, 5)])
def test_first_true_doubling(first, count):
    pred, calls = _counting(first)
    assert search.first_true_doubling(pred, count) == first
    assert len(calls) <= 2 * math.ceil(math.log2(count)) + 1


def test_bracket_float_narrows_to_the_threshold():
    pred, calls = _counting(0.3)
    lo, hi = search.bracket_float(pred, 0.0, 0.9, steps=7)
    assert lo < 0.3 <= hi and hi - lo < 0.9 / 2**6 and len(calls) == 7


def test_hull_steps_skip_dominated_points_and_slopes_rise():
    # (saving, cost): the point (2, 3) lies above the segment from (1, 1) to (3, 4)
    steps = search.hull_steps([(1.0, 1.0, "a"), (2.0, 3.0, "b"), (3.0, 4.0, "c"),
                               (0.0, 0.0, "none")])
    assert [item for _, item in steps] == ["a", "c"]
    assert [s for s, _ in steps] == sorted(s for s, _ in steps)


def test_lagrangian_path_moves_one_group_at_a_time_cheapest_first():
    groups = [("x", [(0.5, "x1"), (2.0, "x2")]), ("y", [(1.0, "y1")])]
    path = search.lagrangian_path(groups)
    assert path == [{}, {"x": "x1"}, {"x": "x1", "y": "y1"}, {"x": "x2", "y": "y1"}]
