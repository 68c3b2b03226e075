"""Answer selection on hand-built trees: greedy-Q path, best terminal, ORM-weighted vote."""

from alphallm_jax.search.answers import best_terminal, choose_answer, greedy_q_leaf, orm_vote
from alphallm_jax.search.tree import SearchProblem, Tree


def build() -> Tree:
    """root -> a (Q 0.9) -> {a1 terminal "5" orm 0.6, a2 terminal "7" orm 0.95};
    root -> b (Q 0.5) -> {b1 terminal "5" orm 0.5, b2 non-terminal}."""
    tree = Tree(SearchProblem("p", "prompt"), config={})
    a = tree.add_child(0, option="a\n")
    b = tree.add_child(0, option="b\n")
    for node, n, w in ((a, 10, 9.0), (b, 10, 5.0)):
        node.N, node.W = n, w
    specs = [(a, "5", 0.6, 4, 3.2), (a, "7", 0.95, 2, 1.9), (b, "5", 0.5, 3, 1.5), (b, None, None, 3, 2.0)]
    for parent, answer, orm, n, w in specs:
        child = tree.add_child(parent.id, option="x\n", terminal=answer is not None, answer=answer, orm=orm,
                               reward=orm)
        child.N, child.W = n, w
    return tree


def test_greedy_follows_the_highest_q_child():
    tree = build()
    assert greedy_q_leaf(tree) == 4  # a (Q 0.9 > 0.5), then a2 (Q 0.95 > a1's 0.8)
    tree.nodes[4].W = 1.0  # a2: Q 0.5, now below a1
    assert greedy_q_leaf(tree) == 3
    tree.nodes[2].W = 9.5  # b: Q 0.95 > a; then b2 (Q 0.67, not terminal) over b1 (Q 0.5)
    assert greedy_q_leaf(tree) == 6
    assert choose_answer(tree, "greedy_q").needs_completion


def test_best_terminal_and_orm_vote_differ_when_mass_beats_the_single_best():
    tree = build()
    assert best_terminal(tree) == 4  # the single best ORM, 0.95 for "7"
    answer, node = orm_vote(tree)
    assert answer == "5" and node == 3  # 0.6 + 0.5 = 1.1 beats 0.95; a1 is its best-scored terminal
    choice = choose_answer(tree, "orm_vote")
    assert (choice.method, choice.answer, choice.node_id, choice.needs_completion) == ("orm_vote", "5", 3, False)


def test_terminal_methods_fall_back_to_a_completed_greedy_path_without_terminals():
    tree = Tree(SearchProblem("p", "prompt"), config={})
    child = tree.add_child(0, option="x\n")
    child.N, child.W = 1, 0.5
    for method in ("best_terminal", "orm_vote", "greedy_q"):
        choice = choose_answer(tree, method)
        assert (choice.method, choice.node_id, choice.needs_completion) == ("greedy_q", child.id, True)


def test_ties_are_broken_by_visits_then_lower_id():
    tree = Tree(SearchProblem("p", "prompt"), config={})
    for n in (2, 3, 3):
        child = tree.add_child(0, option="x\n")
        child.N, child.W = n, 0.5 * n
    assert greedy_q_leaf(tree) == 2


def test_orm_vote_over_rollouts_counts_every_scored_rollout():
    """`orm_vote_rollouts`: terminals and fast rollouts vote with their ORM; the winner's best terminal
    stands for it, or, with no terminal, its best rollout, whose text completes the chosen solution."""
    from alphallm_jax.search.answers import orm_vote_rollouts

    tree = build()
    tree.nodes[1].rollouts = [{"text": "y\n#### 9", "answer": "9", "orm": 0.5},
                              {"text": "z\n#### 7", "answer": "7", "orm": 0.3}]
    tree.nodes[6].rollouts = [{"text": "w\n#### 9", "answer": "9", "orm": 0.7},
                              {"text": "cut off", "answer": None, "orm": 0.9}]
    # 7: 0.95 (terminal a2) + 0.3 = 1.25 > 9: 0.5 + 0.7 = 1.2 > 5: 1.1; 7's terminal stands for it.
    assert orm_vote_rollouts(tree) == ("7", 4, None)
    tree.nodes[1].rollouts[1]["orm"] = 0.2  # 7: 1.15 < 9: 1.2, which only rollouts found
    choice = choose_answer(tree, "orm_vote_rollouts")
    assert (choice.answer, choice.node_id, choice.rollout, choice.needs_completion) == ("9", 6, 0, False)
    tree.chosen_path, tree.chosen_rollout = tree.path_to(6), 0
    assert tree.chosen_text() == "b\nx\nw\n#### 9"
    tree.nodes[6].rollouts[0]["orm"] = 0.1  # 9: 0.6; 7 (terminal a2 0.95 + rollout 0.2) wins by its terminal
    choice = choose_answer(tree, "orm_vote_rollouts")
    assert (choice.answer, choice.node_id, choice.rollout) == ("7", 4, None)
    assert orm_vote(tree) == ("5", 3)  # terminals alone: unchanged


def test_math_votes_merge_equivalent_answers_written_differently():
    """On MATH the ORM vote counts `\\sqrt{2}/2` and `\\frac{\\sqrt{2}}{2}` as one answer (as maj@k does):
    split by spelling, 0.6 + 0.5 lose to the single 0.95; merged they win, and the SFT trace selection
    keeps the trajectories of both spellings."""
    from alphallm_jax.search.answers import vote_share
    from alphallm_jax.train.pairs import ExtractionConfig, extract_sft_traces

    def math_tree(task: str) -> Tree:
        tree = build()
        tree.problem = SearchProblem("p", "prompt", task=task)
        tree.nodes[3].answer, tree.nodes[5].answer = "\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"
        for i in (3, 4, 5):
            tree.nodes[i].finish_reason = "eos"
        return tree

    assert orm_vote(math_tree("gsm8k")) == ("7", 4)  # keys that are not numbers: no merging off MATH
    tree = math_tree("math")
    assert orm_vote(tree) == ("\\sqrt{2}/2", 3)
    answer, share, members = vote_share(tree)
    assert answer == "\\sqrt{2}/2" and abs(share - 1.1 / 2.05) < 1e-9
    assert members == {"\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"}
    traces = extract_sft_traces(tree, ExtractionConfig(orm_threshold=0.0, sft_selection="answer_vote",
                                                       sft_traces_per_prompt=3))
    assert [t["leaf"] for t in traces] == [3, 5]
