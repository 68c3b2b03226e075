"""Importance-weighted expansion: n(s) = max(c_min(t), min(floor(alpha * I(s)) + 1, c_max(t)))."""

import pytest

from alphallm_jax.search.expansion import importance, node_target_children, target_children, wants_child
from alphallm_jax.search.mcts_config import MCTSConfig
from alphallm_jax.search.tree import SearchProblem, Tree

CFG = MCTSConfig(alpha=10.0, c_min0=1, c_max0=8, c_min=2, c_max=5)


@pytest.mark.parametrize("imp,depth,expected", [
    (0.0, 0, 1),   # max(1, min(0 + 1, 8))
    (0.05, 0, 1),  # floor(0.5) + 1 = 1
    (0.3, 0, 4),   # floor(3) + 1
    (0.5, 0, 6),
    (1.5, 0, 8),   # floor(15) + 1 = 16, capped by c_max(0) = 8
    (0.0, 1, 2),   # c_min(t > 0) = 2 wins
    (0.25, 3, 3),  # floor(2.5) + 1
    (0.9, 2, 5),   # capped by c_max(t > 0) = 5
])
def test_target_children_formula(imp, depth, expected):
    assert target_children(imp, depth, CFG) == expected


def test_paper_preset_root_width_is_c_min0_for_values_in_unit_range():
    cfg = MCTSConfig.gsm8k_large()  # alpha 1: floor(I) + 1 <= 2 for I < 2, so c_min dominates
    assert target_children(0.99, 0, cfg) == 40
    assert target_children(0.99, 1, cfg) == 2
    assert target_children(1.5, 1, cfg) == 2
    assert target_children(2.5, 1, cfg) == 3
    # Values are probabilities (I(s) <= 1): with alpha 1 no node ever passes c_min(t), which `widens` says
    # and the search logs; alpha 10 (the paper configs') spans c_min(t)..c_max(t) below the root.
    assert not cfg.widens and not MCTSConfig.gsm8k_small().widens and not cfg.replace(alpha=0.0).widens
    assert cfg.replace(alpha=10.0).widens and target_children(0.55, 1, cfg.replace(alpha=10.0)) == 6
    assert MCTSConfig(alpha=2.0, c_min0=10, c_min=2).widens  # floor(2 * 1) + 1 = 3 > c_min(1) = 2


def test_a_search_config_that_cannot_widen_is_logged(caplog):
    from alphallm_jax.pipeline import search_run

    search_run._WARNED_NARROW.clear()
    with caplog.at_level("WARNING"):
        search_run.mcts_config_from({"preset": "gsm8k_small", "alpha": 10.0})
    assert not caplog.records
    with caplog.at_level("WARNING"):
        search_run.mcts_config_from({"preset": "gsm8k_small"})
        search_run.mcts_config_from({"preset": "gsm8k_small"})  # every stage reads it: logged once
    assert caplog.text.count("search.mcts.alpha=1 never widens a node") == 1


def test_importance_is_the_largest_value_change_a_child_brings():
    assert importance(0.5, [0.4, 0.9, 0.45]) == pytest.approx(0.4)
    assert importance(0.5, [0.4, None]) == pytest.approx(0.1)
    assert importance(None, [0.1, 0.9]) == 0.0
    assert importance(0.5, []) == 0.0


def test_branching_is_re_evaluated_as_children_arrive():
    tree = Tree(SearchProblem("p", "prompt"), config={})
    root = tree.root
    root.value = 0.5
    assert node_target_children(tree, root, CFG) == 1 and wants_child(tree, root, CFG)
    tree.add_child(0, value=0.55)  # I = 0.05 -> n = 1
    assert not wants_child(tree, root, CFG)
    tree.add_child(0, value=0.8)  # I = 0.3 -> n = 4
    assert node_target_children(tree, root, CFG) == 4 and wants_child(tree, root, CFG)
    tree.add_child(0, value=0.5)
    root.pending_children = 1  # the fourth is in flight
    assert not wants_child(tree, root, CFG)
    root.pending_children = 0
    assert wants_child(tree, root, CFG)
    tree.add_child(0, value=0.0)  # I = 0.5 -> n = 6
    assert node_target_children(tree, root, CFG) == 6
    tree.add_child(0, value=-1.0)  # I = 1.5 -> capped at 8
    assert node_target_children(tree, root, CFG) == 8


def test_reward_stands_in_for_a_missing_value_and_terminals_take_no_children():
    tree = Tree(SearchProblem("p", "prompt"), config={})
    child = tree.add_child(0, reward=0.2)
    grandchild = tree.add_child(child.id, reward=0.6)  # I(child) = 0.4 at depth 1 -> floor(4) + 1 = 5
    assert node_target_children(tree, child, CFG) == 5
    grandchild.terminal = True
    assert not wants_child(tree, grandchild, CFG)
