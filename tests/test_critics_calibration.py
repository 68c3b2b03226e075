"""Calibration metrics against hand-computed values."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from alphallm_jax.critics.calibration import (
    auroc,
    auroc_interval,
    auroc_text,
    calibration_metrics,
    expected_calibration_error,
    precision_recall,
    within_group_auroc,
)


def test_ece_by_hand():
    # Two bins: [0, .5) holds .1 and .4 (mean score .25, mean label .5), [.5, 1] holds .8 and .9 (.85 vs 1).
    scores, labels = [0.1, 0.4, 0.8, 0.9], [0, 1, 1, 1]
    assert expected_calibration_error(scores, labels, num_bins=2) == pytest.approx(0.5 * 0.25 + 0.5 * 0.15)
    # Ten bins: each score alone in its bin -> mean |label - score|.
    assert expected_calibration_error(scores, labels, num_bins=10) == pytest.approx((0.1 + 0.6 + 0.2 + 0.1) / 4)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == 0.0  # 1.0 falls in the last bin
    assert expected_calibration_error([0.3] * 10, [1] * 3 + [0] * 7) == pytest.approx(0.0)


def test_auroc_by_hand_and_with_ties():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # Positives .5, .9; negatives .5, .2: pairs 0.5 (tie) + 1 + 1 + 1 out of 4.
    assert auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert auroc([0.2, 0.2, 0.2], [1, 0, 1]) == pytest.approx(0.5)
    assert auroc([0.3, 0.4], [1, 1]) is None


def test_auroc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    s = np.round(rng.random(60), 1)  # many ties
    y = rng.random(60) < 0.4
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in itertools.product(s[y], s[~y])]
    assert auroc(s, y) == pytest.approx(np.mean(pairs))


def test_precision_recall_and_report():
    p, r = precision_recall([0.9, 0.6, 0.4, 0.2], [1, 0, 1, 0])
    assert (p, r) == (0.5, 0.5)
    assert precision_recall([0.1, 0.2], [1, 0]) == (None, 0.0)
    m = calibration_metrics([0.9, 0.6, 0.4, 0.2], [1, 0, 1, 0])
    assert m["n"] == 4 and m["positive_rate"] == 0.5
    assert m["brier"] == pytest.approx((0.01 + 0.36 + 0.36 + 0.04) / 4)
    with pytest.raises(ValueError, match="probabilities"):
        calibration_metrics([1.5], [1])


def test_within_group_auroc_counts_only_pairs_of_one_group():
    # Prompt a: right .3 above wrong .1 (ordered); prompt b: right .6 below wrong .9, tie with wrong .6;
    # prompt c has no wrong solution, so it adds no pair. Pooled: (1 + 0 + 0.5) / 3.
    scores = [0.3, 0.1, 0.6, 0.9, 0.6, 0.8]
    labels = [1, 0, 1, 0, 0, 1]
    groups = ["a", "a", "b", "b", "b", "c"]
    value, pairs = within_group_auroc(scores, labels, groups)
    assert pairs == 3 and value == pytest.approx(1.5 / 3)
    # Scores that order every prompt right but not across prompts: within 1.0, global AUROC under 1.
    s2, y2, g2 = [0.2, 0.1, 0.9, 0.8], [1, 0, 1, 0], ["a", "a", "b", "b"]
    assert within_group_auroc(s2, y2, g2) == (1.0, 2)
    assert auroc(s2, y2) == pytest.approx(0.75)
    # Brute force against pairwise counting within groups, ties included.
    rng = np.random.default_rng(1)
    s, y, g = np.round(rng.random(80), 1), rng.random(80) < 0.4, rng.integers(0, 7, 80)
    pairs = [(1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
             for i, j in itertools.product(range(80), range(80)) if y[i] and not y[j] and g[i] == g[j]]
    assert within_group_auroc(s, y, g) == (pytest.approx(np.mean(pairs)), len(pairs))
    assert within_group_auroc([0.2, 0.4], [1, 0], ["a", "b"]) == (None, 0)
    with pytest.raises(ValueError, match="groups"):
        within_group_auroc([0.2, 0.4], [1, 0], ["a"])


def test_the_value_reference_pools_each_states_own_rollouts_only():
    from alphallm_jax.critics.report import _rollouts_by_state, _state_key

    traj = {"problem_id": "p", "kind": "trajectory", "step_ids": [[1], [2], [3]], "correct": True}
    rows = [traj,
            {"problem_id": "p", "kind": "rollout", "from_step": 1, "step_ids": [[1], [5], [6]], "correct": True},
            {"problem_id": "p", "kind": "rollout", "from_step": 1, "step_ids": [[1], [7]], "correct": False},
            {"problem_id": "p", "kind": "rollout", "from_step": 2, "step_ids": [[1], [2], [9]], "correct": False},
            {"problem_id": "p", "kind": "rollout", "from_step": 2, "step_ids": [[1], [4], [9]], "correct": True},
            {"problem_id": "q", "kind": "rollout", "from_step": 1, "step_ids": [[1], [2]], "correct": True}]
    by_state = _rollouts_by_state(rows)
    # s_1 = [1]: the two rollouts sampled from it (not q's, not the trajectory's own continuation);
    # s_2 = [1], [2]: only the rollout whose first two steps are the trajectory's.
    assert by_state[_state_key("p", 1, traj["step_ids"])] == [1.0, 0.0]
    assert by_state[_state_key("p", 2, traj["step_ids"])] == [0.0]
    assert _state_key("p", 3, traj["step_ids"]) not in by_state
    assert by_state[_state_key("q", 1, [[1]])] == [1.0]


def _grouped_data(num_groups, per_group, seed=0):
    """Scores that rank outcomes above chance, with a difficulty shared by each group's members."""
    rng = np.random.default_rng(seed)
    difficulty = np.repeat(rng.normal(size=num_groups), per_group)
    y = rng.random(num_groups * per_group) < 1 / (1 + np.exp(-2 * difficulty))
    s = 1 / (1 + np.exp(-(difficulty + rng.normal(size=y.size))))
    return s, y, np.repeat(np.arange(num_groups), per_group)


def test_auroc_interval_is_a_seeded_cluster_bootstrap():
    s, y, g = _grouped_data(64, 8)
    lo, hi = auroc_interval(s, y, g, num_resamples=400, seed=3)
    assert lo < auroc(s, y) < hi < 1.0
    assert auroc_interval(s, y, g, num_resamples=400, seed=3) == (lo, hi)  # same seed, same interval
    assert auroc_interval(s, y, g, num_resamples=400, seed=4) != (lo, hi)
    # Drawing single items as if independent understates the spread of grouped data: the interval from
    # resampling the groups is wider than the one from resampling the items.
    lo_i, hi_i = auroc_interval(s, y, np.arange(y.size), num_resamples=400, seed=3)
    assert hi - lo > 1.3 * (hi_i - lo_i)
    # Sixteen times the groups: about a quarter of the width.
    s4, y4, g4 = _grouped_data(1024, 8, seed=1)
    lo4, hi4 = auroc_interval(s4, y4, g4, num_resamples=400, seed=3)
    assert hi4 - lo4 < 0.5 * (hi - lo)


def test_auroc_interval_edge_cases_and_the_metrics_entry():
    assert auroc_interval([0.2, 0.7], [1, 1], [0, 1]) is None  # one class
    # Two groups, each of one class: most resamples draw one group twice and hold one class.
    assert auroc_interval([0.2, 0.7], [0, 1], ["a", "b"], num_resamples=200) is None
    with pytest.raises(ValueError, match="groups"):
        auroc_interval([0.2, 0.7], [0, 1], [0])
    s, y, g = _grouped_data(32, 4)
    m = calibration_metrics(s, y, groups=g, num_resamples=200)
    lo, hi = m["auroc_ci"]
    assert lo < m["auroc"] < hi
    assert "auroc_ci" not in calibration_metrics(s, y)
    assert "auroc_ci" not in calibration_metrics(s, y, groups=g, num_resamples=0)
    assert auroc_text(m) == f"{m['auroc']:.3f} ({lo:.3f}-{hi:.3f})"
    assert auroc_text({"auroc": None}) == "-"
    undefined = calibration_metrics([0.2, 0.7], [1, 1], groups=[0, 1], num_resamples=50)
    assert undefined["auroc_ci"] == [None, None] and auroc_text(undefined) == "-"
