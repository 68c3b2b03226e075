"""Selection: UCT in both forms, PUCT, unvisited-first, virtual loss."""

import math

import numpy as np
import pytest

from alphallm_jax.search.mcts_config import MCTSConfig
from alphallm_jax.search.selection import (
    effective_stats,
    option_priors,
    puct_scores,
    select_child,
    uct_scores,
)
from alphallm_jax.search.tree import SearchProblem, Tree


def test_uct_paper_and_code_forms_match_the_formulas():
    q, n, parent = np.array([0.5, 0.2]), np.array([2, 1]), 3
    paper = uct_scores(q, n, parent, c=1.5, form="paper")
    code = uct_scores(q, n, parent, c=1.5, form="code")
    assert paper[0] == pytest.approx(0.5 + 1.5 * math.sqrt(2 * math.log(3) / 2))
    assert paper[1] == pytest.approx(0.2 + 1.5 * math.sqrt(2 * math.log(3) / 1))
    assert code[0] == pytest.approx(0.5 + 1.5 * math.sqrt(math.log(3) / 2))
    assert code[1] == pytest.approx(0.2 + 1.5 * math.sqrt(math.log(3) / 1))


def test_uct_unvisited_children_score_infinite():
    scores = uct_scores(np.array([0.9, 0.0]), np.array([5, 0]), 5, c=1.0)
    assert np.isinf(scores[1]) and np.isfinite(scores[0])


def test_puct_matches_the_formula_and_priors_are_a_softmax_of_normalised_logprobs():
    q, n, p = np.array([0.4, 0.1]), np.array([3, 0]), np.array([0.25, 0.75])
    scores = puct_scores(q, n, p, parent_n=9, c=2.0)
    assert scores[0] == pytest.approx(0.4 + 2.0 * 0.25 * 3 / 4)
    assert scores[1] == pytest.approx(0.1 + 2.0 * 0.75 * 3 / 1)
    priors = option_priors(np.array([-1.0, -2.0, -0.5]))
    expected = np.exp([-1.0, -2.0, -0.5]) / np.exp([-1.0, -2.0, -0.5]).sum()
    np.testing.assert_allclose(priors, expected)


def make_tree(stats, logprobs=None, token_counts=None):
    """A root with children of the given (N, W)."""
    tree = Tree(SearchProblem("p", "prompt"), config={})
    for i, (n, w) in enumerate(stats):
        child = tree.add_child(0, option=f"o{i}\n")
        child.N, child.W = n, w
        if logprobs is not None:
            child.option_logprob = logprobs[i]
            child.option_token_ids = list(range(token_counts[i]))
    tree.root.N = sum(n for n, _ in stats) + 1
    tree.root.W = sum(w for _, w in stats)
    return tree


def test_select_child_prefers_unvisited_then_highest_uct_then_earliest():
    cfg = MCTSConfig()
    tree = make_tree([(4, 3.0), (0, 0.0), (0, 0.0)])
    assert select_child(tree, tree.root, cfg) == 2  # the earliest unvisited child (ids start at 1)
    tree = make_tree([(4, 2.0), (4, 3.0)])
    assert select_child(tree, tree.root, cfg) == 2
    tree = make_tree([(4, 2.0), (4, 2.0)])
    assert select_child(tree, tree.root, cfg) == 1  # tie: the earliest
    assert select_child(tree, tree.root, cfg, excluded={1}) == 2
    assert select_child(tree, tree.root, cfg, excluded={1, 2}) is None


def test_virtual_loss_turns_selection_away_from_an_in_flight_path():
    cfg = MCTSConfig(c_uct=0.1, virtual_loss=1.0)
    tree = make_tree([(4, 3.2), (4, 2.8)])  # Q 0.8 vs 0.7
    assert select_child(tree, tree.root, cfg) == 1
    tree.nodes[1].virtual_loss = 1
    tree.root.virtual_loss = 1
    assert effective_stats(tree.nodes[1], cfg.virtual_loss) == (5, 2.2)
    assert select_child(tree, tree.root, cfg) == 2


def test_puct_selection_follows_the_prior_among_equal_children():
    cfg = MCTSConfig(selection="puct", c_uct=1.0)
    # Equal N and W; child 2 has the higher per-token log-probability (-0.1 vs -0.5), though a lower sum.
    tree = make_tree([(2, 1.0), (2, 1.0)], logprobs=[-1.0, -2.0], token_counts=[2, 20])
    assert select_child(tree, tree.root, cfg) == 2
