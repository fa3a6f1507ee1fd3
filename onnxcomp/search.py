"""Reaching a target and staying within a bound: the two searches every pass uses.

* :func:`bracket` / :func:`bracket_float`: one monotone bisection. A predicate that is False
  up to some point and True from there on (more pruning is faster; more layers left in float
  lose less) is narrowed to the first True, each evaluation being one measurement.
* :func:`lagrangian_path`: the least-cost allocations of a budget over independent groups
  (layers), one group's move at a time, from each group's lower convex hull of
  (saving, cost) (:func:`hull_steps`).

Nothing here measures anything: callers pass the predicate (a whole-model timing, a fidelity
check), so one search serves the decompositions, pruning and quantization alike.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


def bracket(pred: Callable[[int], bool], lo: int, hi: int,
            max_steps: int | None = None) -> tuple[int, int]:
    """Narrow ``(lo, hi)`` around the first index where a monotone ``pred`` holds.

    ``pred(lo)`` is known False and ``pred(hi)`` known True (neither is evaluated). Bisects
    until the two are neighbours or ``max_steps`` evaluations were spent; returns the bracket
    ``(lo, hi)``: ``hi`` is the mildest index known to hold.
    """
    steps = 0
    while hi - lo > 1 and (max_steps is None or steps < max_steps):
        mid = (lo + hi) // 2
        steps += 1
        if pred(mid):
            hi = mid
        else:
            lo = mid
    return lo, hi


def last_within(within: Callable[[int], bool], limit: int) -> int:
    """The largest index in ``[0, limit]`` where a monotone ``within`` holds (0 always holds).

    ``within`` is True up to some index and False after it (a fidelity bound that more
    aggressive choices break). ``limit`` is tried first: when it holds, nothing else is.
    """
    if within(limit):
        return limit
    lo, _ = bracket(lambda i: not within(i), 0, limit)
    return lo


def first_true_doubling(pred: Callable[[int], bool], count: int) -> int:
    """The smallest ``k`` in ``[1, count]`` where a monotone ``pred`` holds (``count`` if none).

    ``pred(0)`` is known False and ``pred(count)`` assumed True. Tries 1, 2, 4, ... first
    (the answer is usually small), then bisects the last doubling step.
    """
    bad, good, k = 0, count, 1
    while k < count:
        if pred(k):
            good = k
            break
        bad, k = k, 2 * k
    _, good = bracket(pred, bad, good)
    return good


def bracket_float(pred: Callable[[float], bool], lo: float, hi: float, steps: int,
                  digits: int = 4) -> tuple[float, float]:
    """:func:`bracket` on a real interval: ``steps`` bisections, midpoints rounded."""
    for _ in range(steps):
        mid = round((lo + hi) / 2, digits)
        if pred(mid):
            hi = mid
        else:
            lo = mid
    return lo, hi


def hull_steps(points: Sequence[tuple[float, float, T]]) -> list[tuple[float, T]]:
    """One group's moves along its lower convex hull of ``(saving, cost, item)`` points.

    Starting from "leave it alone" (0, 0), each move goes to the point that adds saving at the
    least cost per unit saved (ties: the larger saving); the slopes rise move by move. These are
    the points the Lagrangian ``min cost - lam * saving`` picks as ``lam`` grows. Points that
    save nothing are never picked.
    """
    ahead_all = [pt for pt in points if pt[0] > 0]
    steps: list[tuple[float, T]] = []
    at_s, at_c = 0.0, 0.0
    while True:
        ahead = [pt for pt in ahead_all if pt[0] > at_s]
        if not ahead:
            return steps
        slope, _, i = min(((c - at_c) / (sv - at_s), -sv, i)
                          for i, (sv, c, _) in enumerate(ahead))
        at_s, at_c, item = ahead[i]
        steps.append((slope, item))


def lagrangian_path(groups: Sequence[tuple[K, Sequence[tuple[float, T]]]]
                    ) -> list[dict[K, T]]:
    """Allocations from nothing to the most aggressive, one group's move at a time.

    ``groups`` are ``(key, hull steps)``. Every group's moves are merged in order of their
    cost per unit saved, so each allocation is the least-cost one for its saving (the
    Lagrangian solutions) and the next differs from it in one group. A sweep of ``lam`` would
    jump several groups at once where groups of one shape move at nearly the same ``lam``.
    """
    moves = [(slope, order, key, item)
             for order, (key, steps) in enumerate(groups) for slope, item in steps]
    moves.sort(key=lambda m: (m[0], m[1]))
    path: list[dict[K, T]] = [{}]
    for _, _, key, item in moves:
        path.append({**path[-1], key: item})
    return path
