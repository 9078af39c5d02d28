"""nas.study.trials: scores, ranking and the Pareto front, on hand-made trials."""

from __future__ import annotations

import random

import pytest

from nas.study.trials import epochs_to_target, non_dominated, score


def dominates(a, b):
    """(accuracy, params) a is at least as good as b on both and better on one."""
    return a[0] >= b[0] and a[1] <= b[1] and a != b


def test_score_and_epochs_to_target():
    assert score([90.0, 99.0, 99.5, 99.6], 3) == pytest.approx(99.3666, abs=1e-3)
    assert epochs_to_target([99.5, 99.3, 99.4, 99.45]) == 3
    assert epochs_to_target([99.5, 99.3]) is None


def test_non_dominated_on_random_points_with_ties():
    rng = random.Random(1)
    points = [(rng.choice([98.0, 98.5, 99.0, 99.2, 99.4]), rng.choice([2000, 4000, 6000, 7900])) for _ in range(60)]
    keep = set(non_dominated(points))
    assert keep
    for i in keep:
        assert not any(dominates(q, points[i]) for q in points)
    for j in set(range(len(points))) - keep:
        assert any(dominates(points[i], points[j]) for i in keep)
