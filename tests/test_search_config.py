"""MCTSConfig: presets, construction from dicts and ConfigDicts, validation."""

import ml_collections
import pytest

from alphallm_jax.search.mcts_config import PRESETS, MCTSConfig


def test_presets_carry_the_paper_values():
    small, large = MCTSConfig.gsm8k_small(), MCTSConfig.gsm8k_large()
    assert (small.c_uct, small.c_min0, small.c_min, small.c_max0, small.c_max) == (1.0, 10, 2, 60, 10)
    assert (large.c_uct, large.c_min0, large.c_min) == (1.5, 40, 2)
    math_cfg = MCTSConfig.math()
    assert (math_cfg.c_uct, math_cfg.c_min0, math_cfg.c_min) == (1.0, 20, 3)
    assert MCTSConfig.math_small().c_min0 == 10
    for cfg in (small, large, math_cfg):
        assert (cfg.alpha, cfg.max_resample, cfg.num_simulations, cfg.min_terminals, cfg.hard_cap_factor) == (
            1.0, 5, 40, 40, 10)
        assert (cfg.beta_v, cfg.beta_prm, cfg.beta_orm, cfg.num_rollouts) == (1.0, 1.0, 1.0, 4)
        assert (cfg.selection, cfg.uct_form, cfg.merge_distance, cfg.merge_threshold) == ("uct", "paper", "edit", 20)
    assert MCTSConfig() == small
    assert all(MCTSConfig.preset(name) for name in PRESETS)


def test_from_config_accepts_dicts_and_config_dicts_and_rejects_unknown_keys():
    cfg = MCTSConfig.from_config({"c_uct": 2.0, "merge_distance": "cosine", "merge_threshold": 0.7})
    assert (cfg.c_uct, cfg.merge_distance, cfg.merge_threshold) == (2.0, "cosine", 0.7)
    cd = ml_collections.ConfigDict({"preset": "gsm8k_large", "num_simulations": 80})
    cfg = MCTSConfig.from_config(cd)
    assert (cfg.c_min0, cfg.c_uct, cfg.num_simulations) == (40, 1.5, 80)
    assert MCTSConfig.from_config(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MCTSConfig fields.*c_puct"):
        MCTSConfig.from_config({"c_puct": 1.0})
    with pytest.raises(ValueError, match="unknown MCTS preset"):
        MCTSConfig.from_config({"preset": "gsm9k"})


@pytest.mark.parametrize("changes", [
    {"selection": "ucb"}, {"uct_form": "both"}, {"merge_distance": "jaccard"}, {"answer_selection": "vote"},
    {"c_max": 0}, {"c_min": -1}, {"num_simulations": 0}, {"max_depth": 0}, {"alpha": -1.0},
    {"c_uct": float("nan")}, {"beta_orm": 1.0, "num_rollouts": 0}, {"leaves_per_tree_per_round": 0},
    {"merge_distance": "cosine", "merge_threshold": 20.0}, {"terminal_reward": "value"},
])
def test_invalid_values_are_rejected(changes):
    with pytest.raises(ValueError):
        MCTSConfig(**changes)


def test_derived_quantities():
    cfg = MCTSConfig(num_simulations=30, hard_cap_factor=10, beta_orm=0.0, alpha=0.0, beta_v=0.0)
    assert cfg.max_simulations == 300
    assert cfg.rollouts_per_node == 0
    assert not cfg.needs_value
    assert (cfg.c_min_at(0), cfg.c_min_at(3), cfg.c_max_at(0), cfg.c_max_at(1)) == (10, 2, 60, 10)
