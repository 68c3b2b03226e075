"""Picking the answer of a searched tree: greedy-Q path, best terminal, or ORM-weighted vote (over the
terminals, or over the terminals and every fast rollout, `orm_vote_rollouts`).

Ties are broken deterministically (more visits first, then the lower node id), so a tree always gives
the same answer. These work on loaded trees too, so one search can be graded under every method.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict

from alphallm_jax.data.grading import merge_equivalent_keys
from alphallm_jax.search.tree import Node, Tree


@dataclasses.dataclass(frozen=True)
class AnswerChoice:
    method: str  # the method that produced it (greedy_q when a terminal method found no terminal)
    node_id: int  # the last node of the chosen path
    answer: str | None
    needs_completion: bool  # the greedy path ends at a non-terminal node: roll it out to the end
    rollout: int | None = None  # the answer is this rollout of node_id (its text completes the solution)


def greedy_q_leaf(tree: Tree) -> int:
    """Follow the visited child with the highest Q from the root until a terminal node or a leaf."""
    node = tree.root
    while not node.terminal:
        visited = [tree.nodes[c] for c in node.children if tree.nodes[c].N > 0 and not tree.nodes[c].completion]
        if not visited:
            break
        node = max(visited, key=lambda n: (n.Q, n.N, -n.id))
    return node.id


def _score(node: Node) -> float:
    return node.reward if node.reward is not None else -math.inf


def best_terminal(tree: Tree) -> int | None:
    """The terminal node with the highest critic score (its reward r, the ORM for a terminal)."""
    terminals = tree.terminals()
    if not terminals:
        return None
    return max(terminals, key=lambda n: (_score(n), n.N, -n.id)).id


def orm_vote(tree: Tree) -> tuple[str, int] | None:
    """The answer with the largest ORM mass over terminals, and its best-scored terminal node."""
    vote = _vote(tree, with_rollouts=False)
    return None if vote is None else (vote[0], vote[1])


def orm_vote_rollouts(tree: Tree) -> tuple[str, int, int | None] | None:
    """`orm_vote` with every scored fast rollout as a voter too: the search already sampled and scored
    these complete solutions (their tokens are in its budget), about five times as many as its terminals.
    Returns (answer, node id, rollout index or None): the winning answer's best terminal when it has one,
    else its best-scored rollout."""
    return _vote(tree, with_rollouts=True)


def _ballot(tree: Tree, *, with_rollouts: bool) -> tuple[dict[str, float], dict[str, tuple[tuple, int, int | None]],
                                                      dict[str, str]]:
    """ORM mass per answer, each answer's best voter (terminals before rollouts, then higher ORM, more
    visits, lower node id) as (key, node id, rollout), and the answer each voter's answer counts for: on
    MATH, equivalent answers written differently (`\\sqrt{2}/2`, `\\frac{\\sqrt{2}}{2}`) count for the
    first voter's, as the evaluation's maj@k merges them (`grading.merge_equivalent_keys`)."""
    voters: list[tuple[str, float, tuple, int, int | None]] = []
    for node in tree.terminals():
        if node.answer is not None:
            weight = _orm_weight(node)
            voters.append((node.answer, weight, (1, weight, node.N, -node.id, 0), node.id, None))
    if with_rollouts:
        for node in tree.nodes:
            for k, r in enumerate(node.rollouts):
                if r.get("answer") is not None and r.get("orm") is not None:
                    voters.append((r["answer"], float(r["orm"]), (0, float(r["orm"]), node.N, -node.id, -k), node.id, k))
    distinct = list(dict.fromkeys(v[0] for v in voters))
    group = dict(zip(distinct, merge_equivalent_keys(distinct, tree.problem.task), strict=True))
    mass: dict[str, float] = defaultdict(float)
    best: dict[str, tuple[tuple, int, int | None]] = {}
    for answer, weight, key, node_id, rollout in voters:
        answer = group[answer]
        mass[answer] += weight
        if answer not in best or key > best[answer][0]:
            best[answer] = (key, node_id, rollout)
    return mass, best, group


def _winner(mass: dict[str, float], best: dict[str, tuple[tuple, int, int | None]]) -> str:
    """Ties in mass go to the answer whose representative has the lower node id."""
    return max(mass, key=lambda a: (mass[a], -best[a][1]))


def _vote(tree: Tree, *, with_rollouts: bool) -> tuple[str, int, int | None] | None:
    """The winning answer of the ORM-weighted vote, with its representative (node id, rollout)."""
    mass, best, _ = _ballot(tree, with_rollouts=with_rollouts)
    if not mass:
        return None
    answer = _winner(mass, best)
    return answer, best[answer][1], best[answer][2]


def vote_share(tree: Tree, *, with_rollouts: bool = True) -> tuple[str, float, frozenset[str]] | None:
    """The ORM-vote winner, its share of the total ORM mass, in [0, 1] (how far the search's scored ends
    agree on it; 0.0 when every vote weighs nothing), and the answers that counted for it (itself and, on
    MATH, its equivalents written differently). None when no end has an answer."""
    mass, best, group = _ballot(tree, with_rollouts=with_rollouts)
    if not mass:
        return None
    answer = _winner(mass, best)
    total = sum(mass.values())
    members = frozenset(a for a, g in group.items() if g == answer)
    return answer, (mass[answer] / total if total > 0 else 0.0), members


def _orm_weight(node: Node) -> float:
    return node.orm if node.orm is not None else max(0.0, _score(node))


def choose_answer(tree: Tree, method: str) -> AnswerChoice:
    if method == "best_terminal":
        node_id = best_terminal(tree)
        if node_id is not None:
            return AnswerChoice(method, node_id, tree.nodes[node_id].answer, False)
    elif method == "orm_vote":
        vote = orm_vote(tree)
        if vote is not None:
            return AnswerChoice(method, vote[1], vote[0], False)
    elif method == "orm_vote_rollouts":
        vote = orm_vote_rollouts(tree)
        if vote is not None:
            return AnswerChoice(method, vote[1], vote[0], False, vote[2])
    elif method != "greedy_q":
        raise ValueError(f"unknown answer selection {method!r}")
    leaf = tree.nodes[greedy_q_leaf(tree)]
    return AnswerChoice("greedy_q", leaf.id, leaf.answer, not leaf.terminal)
