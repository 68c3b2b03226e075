"""The lockstep eta-MCTS driver on a synthetic environment with a known best path (no model)."""

import dataclasses

import numpy as np
import pytest

from alphallm_jax.search.expansion import node_target_children
from alphallm_jax.search.mcts import LockstepMCTS, run_mcts
from alphallm_jax.search.mcts_config import MCTSConfig
from alphallm_jax.search.merging import edit_distance
from alphallm_jax.search.protocol import COMPLETE, NodeScores
from alphallm_jax.search.synthetic import SyntheticBackend
from alphallm_jax.search.tree import SearchProblem, Tree

# Small and fast: root width 3 (the three arms, thanks to merging), two children below, no rollouts noise
# needed for most tests.
BASE = MCTSConfig(c_min0=3, c_max0=3, c_min=2, c_max=2, merge_threshold=5, num_simulations=30,
                  min_terminals=3, max_depth=6, leaves_per_tree_per_round=3)


def problems(n, base_seed=0):
    return [SearchProblem(f"p{i}", f"Question {i}?\n", question=f"q{i}", reference="ggg", task="synthetic",
                          seed=base_seed + i) for i in range(n)]


def search(cfg=BASE, n=1, backend=None, base_seed=0):
    backend = backend or SyntheticBackend()
    driver = LockstepMCTS(backend, cfg)
    trees = driver.run(problems(n, base_seed))
    return trees, backend, driver


def arm(node) -> str:
    """The arm (g, f or p) of a one-step synthetic option: the first letter of its phrase."""
    return {"c": "g", "a": "f", "g": "p"}[node.option.split(": ")[1][0]]


def test_uct_visits_concentrate_on_the_best_child():
    cfg = dataclasses.replace(BASE, num_simulations=150, min_terminals=0, c_uct=0.5, c_min=3, c_max=3)
    backend = SyntheticBackend(arm_probs={"g": 1 / 3, "f": 1 / 3, "p": 1 / 3})
    trees, _, _ = search(cfg, n=8, backend=backend)
    best_found = 0
    for tree in trees:
        children = [tree.nodes[c] for c in tree.root.children]
        good = [n for n in children if "carefully" in n.option]
        assert len(good) == 1  # merging kept the root's three options distinct
        others = [n for n in children if n is not good[0]]
        assert good[0].N > max(n.N for n in others) and good[0].N > 0.5 * tree.root.N
        if "ggg" in {n.answer for n in tree.terminals()}:  # the known best path was sampled: it is chosen
            assert tree.answer == "ggg"
            best_found += 1
    assert best_found >= 5


def test_backpropagation_is_exact_throughout_the_search():
    trees, _, _ = search(dataclasses.replace(BASE, num_simulations=60), n=3)
    for tree in trees:
        assert tree.root.N == tree.simulations
        for node in tree.nodes:
            children = [tree.nodes[c] for c in node.children if not tree.nodes[c].completion]
            own_n = node.N - sum(c.N for c in children)
            own_w = node.W - sum(c.W for c in children)
            if node.id == 0:
                assert own_n == 0 and own_w == pytest.approx(0.0, abs=1e-9)
            elif node.completion:
                assert node.N == 0 and node.W == 0.0
            elif node.terminal:  # evaluated once, then revisited: every visit adds its reward
                assert own_n >= 1 and own_w == pytest.approx(own_n * node.reward)
            else:  # interior: its own evaluation plus its children's visits
                assert own_n == 1 and own_w == pytest.approx(node.reward)


def test_branching_follows_the_formula_as_children_arrive():
    class ScriptedValues(SyntheticBackend):
        """The root's children get scripted values (by node id); everything else is the synthetic value."""

        script: dict

        def _evaluate_one(self, r):
            scores = super()._evaluate_one(r)
            if r.node_id in self.script:
                scores.value = self.script[r.node_id]
            return scores

    cfg = MCTSConfig(alpha=10.0, c_min0=2, c_max0=6, c_min=1, c_max=1, beta_prm=0.0, beta_orm=0.0,
                     merge_distance="none", num_simulations=25, min_terminals=0, max_depth=8,
                     leaves_per_tree_per_round=1)
    # Root value 0.5. I(root) after each child, and n(root) = max(2, min(floor(10 I) + 1, 6)):
    cases = [({1: 0.5, 2: 0.5}, 2),  # I = 0: two children
             ({1: 0.5, 2: 0.75, 3: 0.5}, 3),  # the second child lifts I to 0.25: a third child
             ({1: 0.5, 2: 1.5}, 6),  # I = 1: floor(10) + 1 = 11, capped at 6
             ({1: 0.55, 2: 0.5, 3: 0.9, 4: 0.5}, 2)]  # I = 0.05 after two children: no third
    for script, expected in cases:
        backend = ScriptedValues(solution_steps=20)
        backend.script = {k: v for k, v in script.items()}
        trees, _, _ = search(cfg, backend=backend)
        tree = trees[0]
        assert len(tree.root.children) == expected, script
        assert node_target_children(tree, tree.root, cfg) == expected
        for node in tree.nodes:  # no node ever exceeds its n(s)
            assert len(node.children) <= node_target_children(tree, node, cfg)


def test_state_merging_resamples_near_duplicates_in_the_next_round():
    trees, backend, _ = search(dataclasses.replace(BASE, num_simulations=40), n=2)
    calls = backend.calls_of("expand")
    round_of = {}
    for round_index, requests in enumerate(calls):
        for r in requests:
            round_of[(r.problem_id, r.parent_id, r.seed)] = round_index
    resamples = [(i, r) for i, reqs in enumerate(calls) for r in reqs if r.attempt > 0]
    assert resamples, "the synthetic arms collide often: some resampling must happen"
    for tree in trees:
        for node in tree.nodes:
            siblings = [tree.nodes[c] for c in tree.nodes[node.parent].children if c != node.id] if node.id else []
            closest = min((edit_distance(node.option, s.option) for s in siblings), default=99)
            if closest < BASE.merge_threshold:  # a near-duplicate survives only after every resample
                assert node.merged and node.resamples == BASE.max_resample
            assert node.merged == (node.resamples > 0)
    # Each resample request goes out in a later round than the try before it, for the same parent.
    seen = {}
    for round_index, reqs in enumerate(calls):
        for r in reqs:
            if r.kind != COMPLETE:
                key = (r.problem_id, r.parent_id, r.attempt)
                seen.setdefault(key, []).append(round_index)
    for (pid, parent, attempt), rounds in seen.items():
        if attempt > 0:
            earlier = seen[(pid, parent, attempt - 1)]
            assert min(earlier) < min(rounds)


def test_after_max_resample_the_most_distant_sample_is_kept():
    # A policy that only ever writes the good arm: every sibling after the first is a near-duplicate.
    backend = SyntheticBackend(arm_probs={"g": 1.0, "f": 0.0, "p": 0.0})
    cfg = dataclasses.replace(BASE, c_min0=2, c_max0=2, max_resample=2, merge_threshold=30, num_simulations=2,
                              min_terminals=0, leaves_per_tree_per_round=2)
    trees, backend, _ = search(cfg, backend=backend)
    tree = trees[0]
    first, second = (tree.nodes[c] for c in tree.root.children)
    assert not first.merged and first.resamples == 0
    assert second.merged and second.resamples == 2
    root_samples = [(req, res) for req, res in backend.exchanges("expand") if req.parent_id == 0]
    assert root_samples[0][1].text == first.option  # slot 0 was accepted at once
    tries = root_samples[1:]  # slot 1: the first sample and its two resamples, one round apart
    assert [req.attempt for req, _ in tries] == [0, 1, 2]
    distances = [edit_distance(res.text, first.option) for _, res in tries]
    assert max(distances) < cfg.merge_threshold
    assert second.option == tries[int(np.argmax(distances))][1].text
    assert backend.live == {}  # the two discarded samples' states were released


def test_virtual_loss_spreads_the_leaves_of_one_round():
    # Every non-root node takes exactly one child, so two slots on one parent in a round are impossible:
    # k leaves per round must be k distinct nodes, which only virtual loss (and pending slots) ensure.
    cfg = MCTSConfig(c_min0=4, c_max0=4, c_min=1, c_max=1, alpha=0.0, merge_distance="none", beta_orm=0.0,
                     num_simulations=40, min_terminals=0, max_depth=10, leaves_per_tree_per_round=4)
    _, backend, _ = search(cfg, n=3, backend=SyntheticBackend(solution_steps=12))
    calls = backend.calls_of("expand")
    for requests in calls:
        for pid in {r.problem_id for r in requests}:
            mine = [r for r in requests if r.problem_id == pid]
            assert len(mine) <= 4
            slots = [(r.parent_id, r.seed) for r in mine]
            assert len(set(slots)) == len(slots)
            if any(r.parent_id != 0 for r in mine):
                assert len({r.parent_id for r in mine}) == len(mine)
    assert max(len(reqs) for reqs in calls) == 12  # 3 trees x 4 leaves in one call


def test_budget_min_simulations_min_terminals_and_hard_cap():
    exact = dataclasses.replace(BASE, num_simulations=25, min_terminals=0)
    for tree in search(exact, n=3)[0]:
        assert tree.simulations == 25
    enough = dataclasses.replace(BASE, num_simulations=10, min_terminals=8)
    for tree in search(enough, n=3)[0]:
        assert tree.simulations >= 10 and tree.extra["terminals"] >= 8
        assert len(tree.terminals()) == tree.extra["terminals"]
    capped = dataclasses.replace(BASE, num_simulations=10, min_terminals=10_000, hard_cap_factor=3)
    for tree in search(capped, n=2)[0]:
        assert tree.simulations == 30


def test_max_depth_rolls_the_last_option_out_to_the_end():
    cfg = dataclasses.replace(BASE, max_depth=2, num_simulations=20, min_terminals=0)
    trees, backend, _ = search(cfg, n=2, backend=SyntheticBackend(solution_steps=5))
    for req in (r for reqs in backend.calls_of("expand") for r in reqs):
        assert req.to_end == (req.depth >= 2 or req.kind == COMPLETE)
    for tree in trees:
        assert max(n.depth for n in tree.nodes) <= 2
        for node in tree.nodes:
            if node.depth == 2:
                assert node.terminal and node.answer is not None and len(node.answer) == 5


def test_one_call_per_kind_per_round_with_every_tree_in_it():
    trees, backend, driver = search(dataclasses.replace(BASE, num_simulations=20), n=6)
    stats = driver.stats
    assert stats.calls["start"] == 1 and len(backend.calls_of("start")[0]) == 6
    for kind in ("expand", "evaluate", "release"):
        assert stats.calls[kind] <= stats.rounds
        assert len(backend.calls_of(kind)) == stats.calls[kind]
    first = backend.calls_of("expand")[0]
    assert {r.problem_id for r in first} == {f"p{i}" for i in range(6)}
    # Evaluations of the first round: the 6 roots and every accepted child, all in one call.
    assert sum(r.node_id == 0 for r in backend.calls_of("evaluate")[0]) == 6
    # Searching the problems one at a time needs many more calls than in lockstep.
    alone = sum(search(dataclasses.replace(BASE, num_simulations=20), backend=SyntheticBackend(),
                       base_seed=i)[2].stats.calls["expand"] for i in range(6))
    assert stats.calls["expand"] < alone / 3


def test_same_seed_same_trees_whatever_the_batching():
    cfg = dataclasses.replace(BASE, num_simulations=30)
    together = [t.to_records() for t in search(cfg, n=5)[0]]
    again = [t.to_records() for t in search(cfg, n=5)[0]]
    alone = [search(cfg, backend=SyntheticBackend(), base_seed=i)[0][0].to_records() for i in range(5)]
    windowed = [t.to_records() for t in search(dataclasses.replace(cfg, max_active_trees=2), n=5)[0]]
    for i in range(5):
        alone[i][0]["problem_id"] = together[i][0]["problem_id"]  # search() names them p0 alone
        alone[i][0]["prompt"], alone[i][0]["question"] = together[i][0]["prompt"], together[i][0]["question"]
    assert together == again
    # The window changes only the recorded config (max_active_trees), never a tree.
    assert [r[1:] for r in windowed] == [r[1:] for r in together]
    # Trees searched alone differ only in the problem text the synthetic env never reads.
    assert [r[1:] for r in together] == [r[1:] for r in alone]
    other_seed = [t.to_records() for t in search(cfg, n=5, base_seed=100)[0]]
    assert [r[1:] for r in other_seed] != [r[1:] for r in together]


def test_rewards_combine_the_critics_with_their_betas():
    cfg = dataclasses.replace(BASE, beta_v=0.5, beta_prm=2.0, beta_orm=1.5, num_rollouts=3, num_simulations=30)
    trees, backend, _ = search(cfg, n=2)
    for tree in trees:
        for node in tree.nodes[1:]:
            if node.terminal:
                assert node.reward == pytest.approx(node.orm)
                assert node.rollout_orm is None
            else:
                expected = 0.5 * node.value + 2.0 * node.prm + 1.5 * node.rollout_orm
                assert node.reward == pytest.approx(expected)
    for req in (r for reqs in backend.calls_of("evaluate") for r in reqs):
        if req.node_id == 0:
            assert (req.want_value, req.want_prm, req.want_orm, req.num_rollouts) == (True, False, False, 0)
        else:
            assert req.want_orm == req.terminal
            assert req.num_rollouts == (0 if req.terminal else 3)
    scaled = dataclasses.replace(cfg, terminal_reward="orm_scaled")
    for tree in search(scaled, n=1)[0]:
        for node in tree.terminals():
            assert node.reward == pytest.approx(4.0 * node.orm)
    off = dataclasses.replace(cfg, beta_prm=0.0, beta_orm=0.0, alpha=0.0)
    _, backend, _ = search(off, n=1)
    for req in (r for reqs in backend.calls_of("evaluate") for r in reqs):
        assert not req.want_prm and req.num_rollouts == 0


def test_a_missing_critic_score_is_an_error():
    class NoPrm(SyntheticBackend):
        def _evaluate_one(self, r):
            scores = super()._evaluate_one(r)
            scores.prm = None
            return scores

    with pytest.raises(ValueError, match="no prm score"):
        search(BASE, backend=NoPrm())

    class NanValue(SyntheticBackend):
        def _evaluate_one(self, r):
            return NodeScores(value=float("nan"))

    with pytest.raises(ValueError, match="finite"):
        search(BASE, backend=NanValue())


def test_greedy_path_is_completed_to_the_end_when_it_stops_short():
    cfg = dataclasses.replace(BASE, num_simulations=4, min_terminals=0, max_depth=10)
    trees, backend, _ = search(cfg, n=2, backend=SyntheticBackend(solution_steps=8))
    for tree in trees:
        last = tree.nodes[tree.chosen_path[-1]]
        assert last.completion and last.terminal and last.N == 0 and last.W == 0.0
        assert tree.answer == last.answer and len(last.answer) == 8
        assert last.orm is not None and last.reward == pytest.approx(last.orm)
        assert tree.answer_method == "greedy_q"
        parent = tree.nodes[last.parent]
        assert not parent.terminal
    completions = [r for reqs in backend.calls_of("expand") for r in reqs if r.kind == COMPLETE]
    assert len(completions) == 2 and all(r.to_end for r in completions)


@pytest.mark.parametrize("method", ["best_terminal", "orm_vote"])
def test_terminal_answer_methods_choose_a_terminal(method):
    cfg = dataclasses.replace(BASE, answer_selection=method, num_simulations=40)
    for tree in search(cfg, n=3)[0]:
        last = tree.nodes[tree.chosen_path[-1]]
        assert tree.answer_method == method and last.terminal and not last.completion
        assert tree.answer == last.answer
        if method == "best_terminal":
            assert last.reward == max(n.reward for n in tree.terminals())


def test_every_state_is_handed_back_and_trees_stream_out(tmp_path):
    written = []

    def on_done(tree):
        path = tmp_path / f"{tree.problem.problem_id}.jsonl"
        tree.save(path)
        written.append(path)

    backend = SyntheticBackend()
    trees = run_mcts(problems(4), backend, dataclasses.replace(BASE, num_simulations=20), on_tree_done=on_done)
    assert backend.live == {}  # the synthetic backend also checked every parent handle against its path
    assert sorted(p.name for p in written) == [f"p{i}.jsonl" for i in range(4)]
    for tree in trees:
        loaded = Tree.load(tmp_path / f"{tree.problem.problem_id}.jsonl")
        assert loaded.to_records() == tree.to_records()
        assert loaded.to_records()[0]["config"] == dataclasses.asdict(BASE) | {"num_simulations": 20}


def test_generated_tokens_count_every_sample_and_rollout():
    cfg = dataclasses.replace(BASE, num_simulations=30)
    trees, backend, _ = search(cfg, n=2)
    for tree in trees:
        pid = tree.problem.problem_id
        sampled = sum(len(res.token_ids) for req, res in backend.exchanges("expand") if req.problem_id == pid)
        rolled = sum(res.rollout_tokens for req, res in backend.exchanges("evaluate") if req.problem_id == pid)
        assert tree.generated_tokens == sampled + rolled > 0
        requests = sum(req.problem_id == pid for req, _ in backend.exchanges("expand"))
        assert tree.extra["option_samples"] == requests >= len(tree) - 1


@pytest.mark.parametrize("changes", [{"selection": "puct"}, {"uct_form": "code"},
                                     {"merge_distance": "cosine", "merge_threshold": 0.9}])
def test_variants_run_deterministically(changes):
    cfg = dataclasses.replace(BASE, **changes)
    first, backend, _ = search(cfg, n=2)
    second = search(cfg, n=2)[0]
    assert [t.to_records() for t in first] == [t.to_records() for t in second]
    if changes.get("merge_distance") == "cosine":
        assert all(r.want_embedding for reqs in backend.calls_of("expand") for r in reqs)
        assert sum(n.resamples for tree in first for n in tree.nodes) > 0
        for tree in first:  # same-arm siblings (cosine ~1) only survive after max_resample tries
            for parent in tree.nodes:
                arms = [arm(tree.nodes[c]) for c in parent.children if not tree.nodes[c].terminal]
                if len(set(arms)) < len(arms):
                    assert any(tree.nodes[c].resamples == cfg.max_resample for c in parent.children)


def test_duplicate_problem_ids_are_rejected():
    with pytest.raises(ValueError, match="unique"):
        LockstepMCTS(SyntheticBackend(), BASE).run([problems(1)[0], problems(1)[0]])


def test_result_count_mismatch_is_an_error():
    class Short(SyntheticBackend):
        def expand(self, requests):
            return super().expand(requests)[:-1]

    with pytest.raises(ValueError, match="returned"):
        search(BASE, backend=Short())


def test_virtual_loss_sends_the_second_leaf_of_a_round_to_another_subtree():
    from alphallm_jax.search.mcts import _TreeSearch

    def first_round_parents(virtual_loss):
        cfg = MCTSConfig(c_min0=2, c_max0=2, c_min=2, c_max=2, alpha=0.0, c_uct=0.1, virtual_loss=virtual_loss,
                         merge_distance="none", leaves_per_tree_per_round=2, min_terminals=0)
        search_state = _TreeSearch(0, problems(1)[0], cfg)
        tree = search_state.tree
        good, worse = tree.add_child(0, option="a\n"), tree.add_child(0, option="b\n")
        good.N, good.W, worse.N, worse.W = 5, 4.0, 5, 2.0  # Q 0.8 and 0.4; both want two children
        tree.root.N, tree.root.W = 10, 6.0
        search_state.expansion_requests()
        return [slot.parent_id for slot in search_state.slots], tree

    parents, tree = first_round_parents(virtual_loss=0.0)
    assert parents == [1, 1]  # without a virtual loss both leaves pile onto the better subtree
    parents, tree = first_round_parents(virtual_loss=3.0)
    assert parents == [1, 2]
    assert (tree.root.virtual_loss, tree.nodes[1].virtual_loss, tree.nodes[2].virtual_loss) == (2, 1, 1)
    assert (tree.nodes[1].pending_children, tree.nodes[2].pending_children) == (1, 1)


def test_a_window_of_active_trees_bounds_every_batch():
    cfg = dataclasses.replace(BASE, num_simulations=12, max_active_trees=2)
    trees, backend, driver = search(cfg, n=5)
    assert len(trees) == 5 and [t.problem.problem_id for t in trees] == [f"p{i}" for i in range(5)]
    assert all(len(reqs) <= 2 for reqs in backend.calls_of("start"))
    assert sum(len(reqs) for reqs in backend.calls_of("start")) == 5
    for reqs in backend.calls_of("expand"):
        assert len({r.problem_id for r in reqs}) <= 2


def test_a_round_revisits_a_terminal_at_most_k_times_while_slots_are_in_flight():
    from alphallm_jax.search.mcts import _TreeSearch

    # The root's children: X (better, takes one child) and a terminal T. The first selection sends X's
    # child out; every later way down is then blocked, and only T is left to select.
    cfg = MCTSConfig(c_min0=2, c_max0=2, c_min=1, c_max=1, alpha=0.0, merge_distance="none", num_simulations=4,
                     min_terminals=5, hard_cap_factor=10, leaves_per_tree_per_round=2)
    search_state = _TreeSearch(0, problems(1)[0], cfg)
    tree = search_state.tree
    x = tree.add_child(0, option="x\n", N=1, W=0.9, reward=0.9)
    t = tree.add_child(0, option="t\n", N=1, W=0.5, reward=0.5, terminal=True, answer="t")
    tree.root.N, tree.root.W, tree.simulations = 2, 1.4, 2
    requests = search_state.expansion_requests()
    assert [req.parent_id for _, req in requests] == [x.id]
    # Without the bound the round revisits T until the hard cap (40) before X's child has arrived.
    assert tree.simulations == 2 + cfg.leaves_per_tree_per_round and t.N == 1 + cfg.leaves_per_tree_per_round


def _revisits_in_flight_per_round(monkeypatch) -> list[int]:
    """Records, for every tree and round, the terminal revisits made while the tree had slots in flight."""
    from alphallm_jax.search.mcts import _TreeSearch

    counts, selecting = [], []
    select_leaves, backpropagate = _TreeSearch._select_leaves, Tree.backpropagate

    def recording_select_leaves(self):
        selecting.append(self)
        counts.append(0)
        try:
            return select_leaves(self)
        finally:
            selecting.pop()

    def recording_backpropagate(tree, node_id, reward):
        if selecting and selecting[-1].tree is tree and selecting[-1].slots:  # selection backs up revisits only
            counts[-1] += 1
        backpropagate(tree, node_id, reward)

    monkeypatch.setattr(_TreeSearch, "_select_leaves", recording_select_leaves)
    monkeypatch.setattr(Tree, "backpropagate", recording_backpropagate)
    return counts


def test_unreachable_min_terminals_spread_revisits_over_rounds_and_still_finish(monkeypatch):
    # Nine-node trees (three options, two one-step solutions each): min_terminals can never be met, so
    # each tree runs to the hard cap, revisiting its terminals.
    counts = _revisits_in_flight_per_round(monkeypatch)
    cfg = MCTSConfig(c_min0=3, c_max0=3, c_min=2, c_max=2, merge_distance="none", num_simulations=8,
                     min_terminals=100, hard_cap_factor=10, max_depth=6, leaves_per_tree_per_round=2)
    trees, _, _ = search(cfg, n=4, backend=SyntheticBackend(solution_steps=2))
    assert max(counts) == cfg.leaves_per_tree_per_round  # the bound binds, and holds in every round
    for tree in trees:
        assert len(tree) == 10 and len(tree.terminals()) == 6
        # Only terminals left and nothing in flight: the last rounds revisit up to the hard cap and stop.
        assert tree.simulations == tree.root.N == cfg.max_simulations and tree.answer is not None
        assert tree.extra["rounds"] <= 10
    # The bound depends on each tree's own state only: the same trees with one tree per batch.
    alone, _, _ = search(dataclasses.replace(cfg, max_active_trees=1), n=4, backend=SyntheticBackend(solution_steps=2))
    assert [t.to_records()[1:] for t in alone] == [t.to_records()[1:] for t in trees]
