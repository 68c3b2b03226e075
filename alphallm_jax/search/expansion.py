"""Importance-weighted expansion: how many children a node gets.

    n(s) = max(c_min(t), min(floor(alpha * I(s)) + 1, c_max(t))),   I(s) = max_o |v(s, o) - v(s)|

with t the depth of s. I(s) is recomputed from the children present, so a node whose children disagree
with it earns more children as they arrive. v is the node's value-head score, or its reward r(s) when it
has none (for example with the value head off).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from alphallm_jax.search.mcts_config import MCTSConfig
from alphallm_jax.search.tree import Node, Tree

_FLOOR_EPS = 1e-9


def node_score(node: Node) -> float | None:
    """The v(s) that importance compares: the value-head score, else the combined reward."""
    return node.value if node.value is not None else node.reward


def importance(parent_score: float | None, child_scores: Iterable[float | None]) -> float:
    """I(s) = max |v(child) - v(s)| over the scored children; 0 before any child (or v(s)) is known."""
    if parent_score is None:
        return 0.0
    diffs = [abs(c - parent_score) for c in child_scores if c is not None]
    return max(diffs, default=0.0)


def target_children(importance_value: float, depth: int, config: MCTSConfig) -> int:
    """n(s) for a node at `depth` with importance I(s)."""
    # The epsilon keeps float noise (10 * (0.6 - 0.2) = 3.9999...) from dropping a whole child.
    widened = math.floor(config.alpha * importance_value + _FLOOR_EPS) + 1
    return max(config.c_min_at(depth), min(widened, config.c_max_at(depth)))


def node_target_children(tree: Tree, node: Node, config: MCTSConfig) -> int:
    children = (node_score(tree.nodes[c]) for c in node.children if not tree.nodes[c].completion)
    return target_children(importance(node_score(node), children), node.depth, config)


def wants_child(tree: Tree, node: Node, config: MCTSConfig) -> bool:
    """Does this node take one more expansion now (children present plus in flight below n(s))?"""
    if node.terminal:
        return False
    return len(node.children) + node.pending_children < node_target_children(tree, node, config)
