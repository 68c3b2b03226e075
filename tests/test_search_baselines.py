"""Step-level beam search over the search backend protocol, on the synthetic environment."""

import dataclasses

import pytest

from alphallm_jax.search.baselines import BeamSearchConfig, beam_search
from alphallm_jax.search.protocol import COMPLETE
from alphallm_jax.search.synthetic import SyntheticBackend
from alphallm_jax.search.tree import SearchProblem

CFG = BeamSearchConfig(beam_width=3, expansions_per_beam=4, max_depth=10, guide="prm")


def problems(n):
    return [SearchProblem(f"p{i}", f"Question {i}?\n", seed=i) for i in range(n)]


def test_beam_keeps_the_best_states_by_the_guide_and_finds_the_best_path():
    backend = SyntheticBackend(arm_probs={"g": 1 / 3, "f": 1 / 3, "p": 1 / 3})
    trees = beam_search(problems(10), backend, CFG)
    for tree in trees:
        by_depth = {}
        for node in tree.nodes[1:]:
            by_depth.setdefault(node.depth, []).append(node)
        for depth, nodes in by_depth.items():
            expanded = {n.parent for n in by_depth.get(depth + 1, [])}
            unfinished = sorted((n for n in nodes if not n.terminal), key=lambda n: (-n.reward, n.id))
            # The states expanded next are exactly the top beam_width unfinished ones.
            assert expanded == {n.id for n in unfinished[: CFG.beam_width]}
            for parent in expanded:
                assert len(tree.nodes[parent].children) == CFG.expansions_per_beam
        last = tree.nodes[tree.chosen_path[-1]]
        assert last.terminal and tree.answer == last.answer
        assert last.reward == max(n.reward for n in tree.terminals())
        assert tree.answer_method == "beam_prm"
    # Guidance pays: the policy alone averages quality 0.5; the beam's answers are far better.
    assert sum(backend.quality(list(t.answer)) for t in trees) / len(trees) > 0.75
    assert sum(t.answer == "ggg" for t in trees) >= 4
    assert backend.live == {}


def test_lockstep_one_expand_and_one_evaluate_call_per_step():
    backend = SyntheticBackend()
    trees = beam_search(problems(5), backend, CFG)
    expand_calls, evaluate_calls = backend.calls_of("expand"), backend.calls_of("evaluate")
    assert len(expand_calls) == len(evaluate_calls) == max(max(n.depth for n in t.nodes) for t in trees)
    assert {r.problem_id for r in expand_calls[0]} == {f"p{i}" for i in range(5)}
    assert len(expand_calls[0]) == 5 * CFG.expansions_per_beam  # one root each


def test_node_budget_and_completion_when_nothing_finished():
    cfg = dataclasses.replace(CFG, max_nodes=10)
    backend = SyntheticBackend(solution_steps=6)
    for tree in beam_search(problems(3), backend, cfg):
        assert tree.extra["nodes_sampled"] <= 10 + 1
        last = tree.nodes[tree.chosen_path[-1]]
        assert last.terminal and last.completion and len(tree.answer) == 6
    assert any(r.kind == COMPLETE and r.to_end for reqs in backend.calls_of("expand") for r in reqs)
    assert backend.live == {}


@pytest.mark.parametrize("guide,final", [("prm_min", "guide"), ("value", "orm")])
def test_guides_and_final_selection(guide, final):
    cfg = dataclasses.replace(CFG, guide=guide, final_selection=final)
    backend = SyntheticBackend()
    for tree in beam_search(problems(3), backend, cfg):
        for node in tree.nodes[1:]:
            if guide == "prm_min":
                assert node.reward == min(n.prm for n in tree.options_to(node.id))
            else:
                assert node.reward == node.value
        last = tree.nodes[tree.chosen_path[-1]]
        if final == "orm":
            assert last.orm == max(n.orm for n in tree.terminals())
    wanted = [r for reqs in backend.calls_of("evaluate") for r in reqs]
    assert all(r.want_value == (guide == "value") and r.num_rollouts == 0 for r in wanted)


def test_beam_config_rejects_bad_values_and_unknown_keys():
    with pytest.raises(ValueError):
        BeamSearchConfig(guide="orm")
    with pytest.raises(ValueError):
        BeamSearchConfig(beam_width=0)
    with pytest.raises(ValueError, match="unknown"):
        BeamSearchConfig.from_config({"width": 3})
    assert BeamSearchConfig.from_config({"beam_width": 2}).beam_width == 2
