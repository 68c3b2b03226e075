"""The search tree: exact backpropagation, the JSONL schema, round trips, seeds."""

import json
import os

import numpy as np
import pytest

from alphallm_jax.search.tree import (
    HEADER_KEYS,
    SearchProblem,
    Tree,
    derive_seed,
    load_tree,
    problem_seed,
    write_tree,
)
from alphallm_jax.utils.io import DataFormatError

SCHEMA_NODE_KEYS = {"kind", "id", "parent", "depth", "option", "option_token_ids", "option_logprob", "N", "W",
                    "Q", "value", "prm", "orm", "rollout_orm", "reward", "terminal", "answer", "finish_reason",
                    "merged", "resamples", "children"}
SCHEMA_HEADER_KEYS = {"kind", "problem_id", "question", "prompt", "reference", "task", "config", "seed",
                      "chosen_path", "answer", "answer_method", "num_nodes", "generated_tokens", "simulations"}


def random_tree(rng, size=40) -> Tree:
    tree = Tree(SearchProblem("p-1", "Q: <x> & \"y\"\n", question="q?", reference="42", task="arith", seed=3),
                config={"c_uct": 1.0})
    for _ in range(size - 1):
        parent = int(rng.integers(0, len(tree)))
        tree.add_child(parent, option=f"step {len(tree)} é😀 <b>\n", option_token_ids=[1, 2, len(tree)],
                       option_logprob=-float(rng.random()), value=float(rng.random()), prm=None,
                       terminal=bool(rng.random() < 0.3), answer="7" if rng.random() < 0.5 else None,
                       finish_reason="stop")
    return tree


def test_backpropagation_sums_are_exact_on_every_ancestor():
    rng = np.random.default_rng(0)
    tree = random_tree(rng)
    updates = [(int(rng.integers(0, len(tree))), float(rng.normal())) for _ in range(200)]
    for node_id, reward in updates:
        tree.backpropagate(node_id, reward)
    for node in tree.nodes:
        # A node receives exactly the updates made at itself or anywhere in its subtree.
        mine = [r for i, r in updates if node.id in tree.path_to(i)]
        assert node.N == len(mine)
        assert node.W == pytest.approx(sum(mine), abs=1e-9)
        assert node.Q == pytest.approx(sum(mine) / len(mine) if mine else 0.0)


def test_paths_depths_and_solution_text():
    tree = Tree(SearchProblem("p", "Question\n"), config={})
    a = tree.add_child(0, option="a\n")
    b = tree.add_child(a.id, option="b\n")
    tree.add_child(0, option="c\n")
    assert tree.path_to(b.id) == [0, a.id, b.id]
    assert (b.depth, a.depth, tree.root.depth) == (2, 1, 0)
    assert tree.solution_text(b.id) == "a\nb\n"
    assert tree.solution_text(b.id, with_prompt=True) == "Question\na\nb\n"
    assert tree.root.children == [1, 3]


def test_jsonl_schema_and_round_trip(tmp_path):
    tree = random_tree(np.random.default_rng(1))
    tree.backpropagate(5, 0.25)
    tree.chosen_path = tree.path_to(5)
    tree.answer, tree.answer_method, tree.generated_tokens, tree.simulations = "7", "greedy_q", 123, 9
    tree.extra["terminals"] = 4
    path = tmp_path / "trees" / "p-1.jsonl"
    write_tree(path, tree)
    assert os.listdir(path.parent) == ["p-1.jsonl"]  # atomic: no temporary file left behind
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + len(tree)
    header = json.loads(lines[0])
    assert set(header) >= SCHEMA_HEADER_KEYS and set(HEADER_KEYS) == SCHEMA_HEADER_KEYS
    assert header["kind"] == "problem" and header["num_nodes"] == len(tree) and header["terminals"] == 4
    for i, line in enumerate(lines[1:]):
        record = json.loads(line)
        assert set(record) >= SCHEMA_NODE_KEYS
        assert record["kind"] == "node" and record["id"] == i
    root = json.loads(lines[1])
    assert root["parent"] is None and root["depth"] == 0 and root["option"] == ""

    loaded_header, loaded_nodes = load_tree(path)
    assert loaded_header == header
    again = Tree.load(path)
    assert again.to_records() == tree.to_records()
    assert again.solution_text(5, with_prompt=True) == tree.solution_text(5, with_prompt=True)


def test_rollouts_and_a_chosen_rollout_round_trip_and_older_files_still_load(tmp_path):
    tree = random_tree(np.random.default_rng(2))
    tree.nodes[3].rollouts = [{"text": " then 2+2=4\n#### 4", "answer": "4", "orm": 0.8},
                              {"text": " no end", "answer": None, "orm": 0.1}]
    tree.chosen_path, tree.chosen_rollout, tree.answer = tree.path_to(3), 0, "4"
    path = tmp_path / "t.jsonl"
    write_tree(path, tree)
    again = Tree.load(path)
    assert again.to_records() == tree.to_records() and again.chosen_rollout == 0
    assert again.chosen_text() == tree.solution_text(3) + " then 2+2=4\n#### 4"
    old_rows = [json.loads(line) for line in path.read_text().splitlines()]  # as written before rollouts were kept
    old_rows[0].pop("chosen_rollout")
    for row in old_rows[1:]:
        row.pop("rollouts")
    path.write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    old = Tree.load(path)
    assert old.chosen_rollout is None and all(n.rollouts == [] for n in old.nodes)
    assert old.chosen_text() == tree.solution_text(3)


@pytest.mark.parametrize("breakage,match", [
    (lambda rows: rows[1:], "header"),
    (lambda rows: [rows[0], *rows[2:]], "ids"),
    (lambda rows: [{**rows[0], "num_nodes": 99}, *rows[1:]], "nodes"),
    (lambda rows: [rows[0], {**rows[1], "parent": 0}, *rows[2:]], "root"),
    (lambda rows: [rows[0], {k: v for k, v in rows[1].items() if k != "W"}, *rows[2:]], "lacks"),
    (lambda rows: [rows[0], {**rows[1], "children": [77]}, *rows[2:]], "children"),
])
def test_load_tree_rejects_malformed_files(tmp_path, breakage, match):
    tree = random_tree(np.random.default_rng(2), size=5)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in breakage(tree.to_records())))
    with pytest.raises(DataFormatError, match=match):
        load_tree(path)


def test_seeds_are_stable_and_independent_of_position():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert derive_seed(1, 2, 3) != derive_seed(1, 2, 4)
    assert 0 <= derive_seed(7) < 2**31
    assert problem_seed(0, "gsm8k-test-00001") == problem_seed(0, "gsm8k-test-00001")
    assert problem_seed(0, "gsm8k-test-00001") != problem_seed(0, "gsm8k-test-00002")
    assert problem_seed(0, "a") != problem_seed(1, "a")
