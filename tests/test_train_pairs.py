"""Trace and pair extraction on a hand-built search tree written in the search's JSONL schema."""

from __future__ import annotations

import dataclasses
import json

import pytest

from alphallm_jax.search.mcts_config import MCTSConfig
from alphallm_jax.search.tree import Node, Tree
from alphallm_jax.train import pairs as pairs_lib
from alphallm_jax.train.cpl import select_pairs
from alphallm_jax.train.pairs import ExtractionConfig
from alphallm_jax.utils.io import DataFormatError, read_jsonl

EOS = 2
PROMPT = "Question: q\nAnswer:\n"

#                 0 (root)
#        /        |         \
#   1 Q2.0     2 Q0.5      3 Q1.8 (unexpanded leaf: no completion)
#   / |  \      |    \
#  4  5   8     6     7 (terminal cut at the token limit: not complete)
#         |
#         9
# Terminals 4, 5, 6, 9 are complete; per node (Q, reward).
SPEC = {
    # id: (parent, Q, N, reward, terminal, finish_reason, token ids)
    1: (0, 2.0, 6, 0.7, False, None, [11, 12]),
    2: (0, 0.5, 4, 0.2, False, None, [21, 22]),
    3: (0, 1.8, 1, 0.5, False, None, [31]),
    4: (1, 2.5, 3, 0.9, True, "eos", [41, 42, EOS]),
    5: (1, 0.2, 1, 0.1, True, "eos", [51, EOS]),
    6: (2, 1.5, 2, 0.3, True, "stop", [61, 62]),
    7: (2, -1.0, 1, 0.0, True, "length", [71, 72, 73]),
    8: (1, 1.2, 2, 0.4, False, None, [81, 82]),
    9: (8, 1.2, 1, 0.6, True, "eos", [91, EOS]),
}


def write_tree(path, spec=SPEC, problem_id="p0"):
    children = {i: [] for i in range(len(spec) + 1)}
    for i, (parent, *_rest) in spec.items():
        children[parent].append(i)
    depth = {0: 0}
    for i in sorted(spec):
        depth[i] = depth[spec[i][0]] + 1
    header = {"kind": "problem", "problem_id": problem_id, "question": "q", "prompt": PROMPT,
              "reference": "999", "task": "arith", "config": {}, "seed": 0, "chosen_path": [0, 1, 4],
              "answer": "4", "answer_method": "greedy_q", "num_nodes": len(spec) + 1,
              "generated_tokens": 20, "simulations": 10}
    rows = [header, {"kind": "node", "id": 0, "parent": None, "depth": 0, "option": "",
                     "option_token_ids": [], "option_logprob": 0.0, "N": 10, "W": 12.0, "Q": 1.2,
                     "value": 0.5, "prm": None, "orm": None, "rollout_orm": None, "reward": None,
                     "terminal": False, "answer": None, "finish_reason": None, "merged": False,
                     "resamples": 0, "children": children[0]}]
    for i in sorted(spec):
        parent, q, n, reward, terminal, finish, tokens = spec[i]
        rows.append({"kind": "node", "id": i, "parent": parent, "depth": depth[i],
                     "option": f"#### {i}" if terminal else f"s{i}\n", "option_token_ids": tokens,
                     "option_logprob": -1.0, "N": n, "W": q * n, "Q": q, "value": reward / 2,
                     "prm": 0.5, "orm": reward if terminal else None, "rollout_orm": None,
                     "reward": reward, "terminal": terminal, "answer": str(i) if terminal else None,
                     "finish_reason": finish, "merged": False, "resamples": 0, "children": children[i]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tree(tmp_path):
    return Tree.load(write_tree(tmp_path / "p0.jsonl"))


def summary(pairs):
    return [(p["kind"], p["prefix_node"], p["chosen"]["path"], p["rejected"]["path"],
             round(p["gap"], 6), round(p["reward_gap"], 6)) for p in pairs]


def test_complete_means_finished():
    def node(finish, answer, terminal=True):
        return Node(1, 0, 1, terminal=terminal, finish_reason=finish, answer=answer)

    assert pairs_lib.is_complete(node("eos", None)) and pairs_lib.is_complete(node("stop", "4"))
    assert not pairs_lib.is_complete(node("stop", None))  # cut at max_depth
    assert not pairs_lib.is_complete(node("length", "4"))
    assert not pairs_lib.is_complete(node("eos", "4", terminal=False))


def test_completions(tree):
    best = pairs_lib.completions(tree, ExtractionConfig())
    assert best == [4, 4, 6, None, 4, 5, 6, None, 9, 9]
    # greedy_q differs where the highest-Q path does not reach the best-scored end: with node 9
    # scored above node 4, best_terminal picks 9 under nodes 0, 1 while greedy Q follows 1 -> 4.
    tree.nodes[9].reward = 0.95
    assert pairs_lib.completions(tree, ExtractionConfig())[:2] == [9, 9]
    assert pairs_lib.completions(tree, ExtractionConfig(completion="greedy_q")) == \
        [4, 4, 6, None, 4, 5, 6, None, 9, 9]


def test_stepwise_complete_and_q_pairs_exactly(tree):
    got = pairs_lib.extract_pairs(tree, ExtractionConfig(tau=1.0))
    assert summary(got) == [
        # (kind, prefix node, chosen path, rejected path, value gap, r_g = summed step rewards)
        # stepwise: siblings with Q gap > 1, each continued to its best complete terminal
        ("stepwise", 0, [1, 4], [2, 6], 1.5, 1.1),
        ("stepwise", 1, [4], [5], 2.3, 0.8),
        ("stepwise", 1, [4], [8, 9], 1.3, -0.1),
        # complete: complete trajectories with leaf-Q gap > 1, prefix = their common ancestor
        ("complete", 1, [4], [5], 2.3, 0.8),
        ("complete", 1, [4], [8, 9], 1.3, -0.1),
        ("complete", 0, [2, 6], [1, 5], 1.3, -0.3),
        # Q baseline: per depth, highest- vs lowest-Q node with a completion
        ("q_pair", 0, [1, 4], [2, 6], 1.5, 1.1),
        ("q_pair", 1, [4], [5], 2.3, 0.8),
    ]
    first = got[0]
    assert first["pair_id"] == "p0/stepwise/1-2" and first["problem_id"] == "p0"
    assert first["prompt"] == PROMPT and first["prefix_token_ids"] == [] and first["prefix_text"] == ""
    assert first["chosen"]["token_ids"] == [11, 12, 41, 42, EOS]
    assert first["chosen"]["text"] == "s1\n#### 4"
    assert first["rejected"]["token_ids"] == [21, 22, 61, 62]
    assert (first["chosen"]["node"], first["chosen"]["leaf"], first["chosen"]["q"]) == (1, 4, 2.0)
    assert first["chosen"]["step_rewards"] == [0.7, 0.9]
    assert first["rejected"]["step_rewards"] == [0.2, 0.3]
    second = got[1]
    assert second["prefix_path"] == [1] and second["prefix_token_ids"] == [11, 12]
    assert second["prefix_text"] == "s1\n"
    # The reference answer is never used: changing it changes nothing.
    tree.problem = dataclasses.replace(tree.problem, reference="4")
    assert summary(pairs_lib.extract_pairs(tree, ExtractionConfig(tau=1.0))) == summary(got)


def test_tau_cap_and_step_reward_field(tree):
    assert summary(pairs_lib.extract_pairs(tree, ExtractionConfig(tau=2.0), kinds=("stepwise",))) == [
        ("stepwise", 1, [4], [5], 2.3, 0.8)]
    capped = pairs_lib.extract_pairs(tree, ExtractionConfig(tau=1.0, max_pairs_per_prompt=2),
                                     kinds=("stepwise",))
    assert [p["pair_id"] for p in capped] == ["p0/stepwise/1-2", "p0/stepwise/4-5"]  # largest gaps
    prm = pairs_lib.extract_pairs(tree, ExtractionConfig(step_reward_field="prm"), kinds=("stepwise",))
    assert prm[2]["chosen"]["step_rewards"] == [0.5] and prm[2]["rejected"]["step_rewards"] == [0.5, 0.5]
    assert prm[2]["reward_gap"] == pytest.approx(-0.5)


def test_sft_trace_and_threshold(tree):
    [trace] = pairs_lib.extract_sft_traces(tree, ExtractionConfig(orm_threshold=0.5))
    assert (trace["leaf"], trace["path"], trace["token_ids"], trace["orm"]) == (4, [1, 4], [11, 12, 41, 42, EOS], 0.9)
    assert trace["text"] == "s1\n#### 4" and trace["prompt"] == PROMPT and trace["rank"] == 0
    assert pairs_lib.extract_sft_traces(tree, ExtractionConfig(orm_threshold=0.95)) == []


def test_sft_traces_per_prompt(tmp_path, tree):
    """Up to k complete trajectories in score order, each passing the ORM threshold; the first that
    fails ends the list; a trajectory whose text repeats a better one's is skipped."""
    def leaves(t, **kw):
        return [r["leaf"] for r in pairs_lib.extract_sft_traces(t, ExtractionConfig(**kw))]

    assert leaves(tree, orm_threshold=0.05, sft_traces_per_prompt=3) == [4, 9, 6]
    assert leaves(tree, orm_threshold=0.05, sft_traces_per_prompt=9) == [4, 9, 6, 5]
    assert leaves(tree, orm_threshold=0.5, sft_traces_per_prompt=9) == [4, 9]
    ranks = [r["rank"] for r in pairs_lib.extract_sft_traces(tree, ExtractionConfig(
        orm_threshold=0.05, sft_traces_per_prompt=3))]
    assert ranks == [0, 1, 2]
    # Node 5 becomes a second-best twin of 4: "s1\n#### 4" again.
    path = write_tree(tmp_path / "twin.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1 + 5].update(option="#### 4", option_token_ids=[41, 42, EOS], reward=0.8, orm=0.8, answer="4")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert leaves(Tree.load(path), orm_threshold=0.05, sft_traces_per_prompt=2) == [4, 9]
    with pytest.raises(ValueError, match="sft_traces_per_prompt"):
        ExtractionConfig(sft_traces_per_prompt=0)


def test_sft_trace_by_answer_vote(tmp_path):
    """`answer_vote`: the best-scored complete trajectory among those reaching the ORM vote's winner
    (terminals and fast rollouts vote), skipped when the winner's share of the ORM mass is too small."""
    path = write_tree(tmp_path / "p0.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # Terminal ORMs: 4 -> 0.9, 5 -> 0.1, 6 -> 0.3, 7 -> 0.0, 9 -> 0.6; a rollout from node 8 also ends at 9,
    # so 9 wins 1.1 to 0.9 out of 2.4, while the single best-scored trajectory still ends at 4.
    rows[1 + 8]["rollouts"] = [{"text": "x\n#### 9", "answer": "9", "orm": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tree = Tree.load(path)
    assert pairs_lib.extract_sft_traces(tree, ExtractionConfig(orm_threshold=0.5))[0]["leaf"] == 4
    vote = ExtractionConfig(orm_threshold=0.5, sft_selection="answer_vote", min_vote_share=0.45)
    [trace] = pairs_lib.extract_sft_traces(tree, vote)
    assert (trace["leaf"], trace["path"], trace["answer"]) == (9, [1, 8, 9], "9")
    assert trace["vote_share"] == pytest.approx(1.1 / 2.4)
    assert pairs_lib.extract_sft_traces(tree, dataclasses.replace(vote, min_vote_share=0.5)) == []
    assert pairs_lib.extract_sft_traces(tree, dataclasses.replace(vote, orm_threshold=0.7)) == []
    with pytest.raises(ValueError, match="sft_selection"):
        ExtractionConfig(sft_selection="vote")
    with pytest.raises(ValueError, match="min_vote_share"):
        ExtractionConfig(min_vote_share=1.5)


def test_directory_artifacts_and_selection(tmp_path, monkeypatch):
    trees_dir = tmp_path / "trees"
    trees_dir.mkdir()
    write_tree(trees_dir / "b.jsonl", problem_id="b")
    write_tree(trees_dir / "a.jsonl", problem_id="a")
    trees = pairs_lib.read_trees(trees_dir)
    assert [t.problem.problem_id for t in trees] == ["a", "b"]
    traces, pairs = pairs_lib.extract_all(trees, ExtractionConfig())
    assert [t["problem_id"] for t in traces] == ["a", "b"]
    # Several directories (the loop's accumulated SFT traces): every tree, in directory order.
    (tmp_path / "more").mkdir()
    write_tree(tmp_path / "more" / "c.jsonl", problem_id="c")
    both_dirs = f"{tmp_path / 'more'}, {trees_dir}"
    assert [t.problem.problem_id for t in pairs_lib.read_trees(both_dirs)] == ["c", "a", "b"]
    write_tree(tmp_path / "more" / "a.jsonl", problem_id="a")
    with pytest.raises(ValueError, match=r"tree a\.jsonl is in both .*more and .*trees"):
        pairs_lib.read_trees(both_dirs)
    with pytest.raises(FileNotFoundError, match="missing"):
        pairs_lib.read_trees(f"{trees_dir},{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="empty directory"):
        pairs_lib.read_trees(f"{trees_dir},")
    # A comma in a directory's own name (a workdir called "run,2") is part of that name.
    comma_dirs = [tmp_path / "run,2" / "trees", tmp_path / "run,2" / "more,trees"]
    for i, d in enumerate(comma_dirs):
        d.mkdir(parents=True)
        write_tree(d / f"x{i}.jsonl", problem_id=f"x{i}")
    assert pairs_lib.tree_dirs(comma_dirs[0]) == [comma_dirs[0]]
    assert pairs_lib.tree_dirs(f"{comma_dirs[0]},{comma_dirs[1]}") == comma_dirs
    assert [t.problem.problem_id for t in pairs_lib.read_trees(f"{comma_dirs[1]},{comma_dirs[0]}")] == ["x1", "x0"]
    with pytest.raises(FileNotFoundError, match=r"directory \S*run,2/gone does not exist"):
        pairs_lib.read_trees(f"{comma_dirs[0]},{tmp_path / 'run,2' / 'gone'}")
    with pytest.raises(FileNotFoundError, match=r"directory \S*/nothing,\S*/trees does not exist"):
        pairs_lib.read_trees(f"{tmp_path / 'nothing'},{trees_dir}")
    # "a,b,c" where a, "a,b", "b,c" and c all exist: two readings, so it is refused, not guessed.
    for name in ("a", "a,b", "b,c", "c"):
        (tmp_path / "amb" / name).mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "amb")  # relative directory names
    with pytest.raises(ValueError, match="splits at its commas into existing directories in 2 ways"):
        pairs_lib.tree_dirs("a,b,c")
    assert pairs_lib.pair_counts(pairs) == {"stepwise": 6, "complete": 6, "q_pair": 4}
    pairs_lib.write_records(tmp_path / "pairs.jsonl", pairs)
    assert read_jsonl(tmp_path / "pairs.jsonl") == pairs
    # CPL and PL-shuffle train on stepwise + complete pairs, a complete pair that is token for token
    # a stepwise one (same prefix, same leaves) once; CO on complete pairs; Q on the Q pairs.
    both = select_pairs(pairs, "cpl")
    assert [p["pair_id"] for p in both if p["problem_id"] == "a"] == [
        "a/stepwise/1-2", "a/stepwise/4-5", "a/stepwise/4-8", "a/complete/6-5"]
    assert select_pairs(pairs, "shuffle") == both
    assert [p["kind"] for p in select_pairs(pairs, "complete_only")] == ["complete"] * 6
    assert [p["kind"] for p in select_pairs(pairs, "q_pairs")] == ["q_pair"] * 4


def test_malformed_tree_is_named(tmp_path):
    path = write_tree(tmp_path / "t.jsonl")
    lines = path.read_text().splitlines()
    node = json.loads(lines[3])
    node["parent"] = 3  # node 2 claims parent 3, while the root (line 2) lists it as its child
    lines[3] = json.dumps(node)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"t.jsonl:2: children \[1, 2, 3\] do not name node 0"):
        Tree.load(path)


def test_a_margin_beyond_the_q_scale_is_refused_and_the_largest_sibling_gap_is_reported(tree, caplog):
    # Value-only search (the CPL presets): Q is a probability, so a margin of 1 admits no pair at all.
    value_only = MCTSConfig(beta_v=1.0, beta_prm=0.0, beta_orm=0.0, num_rollouts=0)
    with pytest.raises(ValueError, match=r"tau=1: .*Q lies in \[0, 1\] with search.mcts beta_v=1, beta_prm=0"):
        pairs_lib.check_pair_margin(1.0, value_only)
    pairs_lib.check_pair_margin(0.5, value_only)
    three_critics = MCTSConfig(beta_v=1.0, beta_prm=1.0, beta_orm=1.0)  # AlphaLLM's: Q in [0, 3]
    with pytest.raises(ValueError, match=r"Q lies in \[0, 3\]"):
        pairs_lib.check_pair_margin(3.0, three_critics)
    # The paper's terminal reward is the bare ORM: a complete trajectory's Q lies in [0, 1] while an interior
    # node's reaches 3, so a margin of 1 admits no complete pair (stepwise pairs remain: a warning);
    # orm_scaled puts terminals on [0, 3].
    with caplog.at_level("WARNING"):
        pairs_lib.check_pair_margin(0.5, three_critics)
        pairs_lib.check_pair_margin(1.0, three_critics.replace(terminal_reward="orm_scaled"))
        assert not caplog.records
        pairs_lib.check_pair_margin(1.0, three_critics)
    assert "no complete pair can be extracted, since a complete trajectory's Q" in caplog.text
    assert "lies in [0, 1] with search.mcts.terminal_reward='orm'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        pairs_lib.check_pair_margin(1.0, three_critics.replace(terminal_reward="orm_scaled"), "orm")
    assert "complete trajectory's orm (policy_train.complete_value_field) lies in [0, 1]" in caplog.text
    assert pairs_lib.q_scale(0.5, 0.25, 0.0) == 1.0  # a terminal's ORM reaches 1 whatever the betas
    # Siblings 6 (Q 1.5) and 7 (Q -1.0) under node 2; with two visits required, 1 and 2 under the root.
    assert pairs_lib.largest_sibling_gap([tree]) == pytest.approx(2.5)
    assert pairs_lib.largest_sibling_gap([tree], min_visits=2) == pytest.approx(1.5)
    assert pairs_lib.largest_sibling_gap([]) == 0.0


def test_pairs_of_twin_texts_are_left_out(tmp_path):
    # Node 8 re-samples node 5's text (no state merging): 4 is preferred to either, but 5 and 8 differ by
    # their Q alone, so their stepwise pair states no preference and is left out; so is the Q pair at
    # depth 2 that would pit 9 (a twin of 6's text) against 6.
    spec = dict(SPEC)
    spec[8] = (1, 1.2, 2, 0.4, True, "eos", [51, EOS])  # the same tokens as node 5, a leaf now
    spec[9] = (2, 0.1, 1, 0.6, True, "stop", [61, 62])  # the same tokens as node 6
    twins = Tree.load(write_tree(tmp_path / "twins.jsonl", spec=spec))
    pairs = pairs_lib.extract_pairs(twins, ExtractionConfig(tau=0.5, min_visits=1))
    assert pairs and all(p["chosen"]["token_ids"] != p["rejected"]["token_ids"] for p in pairs)
    kept = {(p["kind"], p["chosen"]["node"], p["rejected"]["node"]) for p in pairs}
    assert ("stepwise", 8, 5) not in kept and ("stepwise", 4, 5) in kept and ("stepwise", 4, 8) in kept
    assert ("stepwise", 6, 9) not in kept
