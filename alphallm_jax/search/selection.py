"""Child selection: UCT (paper form with the 2, or the authors' code form without), PUCT, virtual loss.

Virtual loss: every selection still in flight through a node counts as one more visit that returned
`-virtual_loss`, so the next selection of the same round prefers other paths and one tree can send
several distinct leaves per round.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from alphallm_jax.search.mcts_config import MCTSConfig
from alphallm_jax.search.tree import Node, Tree


def effective_stats(node: Node, virtual_loss: float) -> tuple[float, float]:
    """(N, W) of a node with its in-flight selections counted as losses."""
    return node.N + node.virtual_loss, node.W - node.virtual_loss * virtual_loss


def uct_scores(q: np.ndarray, n: np.ndarray, parent_n: float, c: float, form: str = "paper") -> np.ndarray:
    """`Q + c * sqrt(k * ln N_parent / N)`, k = 2 (paper) or 1 (code); +inf for unvisited children."""
    k = 2.0 if form == "paper" else 1.0
    q, n = np.asarray(q, np.float64), np.asarray(n, np.float64)
    log_parent = np.log(max(float(parent_n), 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = q + c * np.sqrt(k * log_parent / n)
    return np.where(n > 0, scores, np.inf)  # unvisited children first


def puct_scores(q: np.ndarray, n: np.ndarray, prior: np.ndarray, parent_n: float, c: float) -> np.ndarray:
    """`Q + c * P * sqrt(N_parent) / (1 + N)` (an unvisited child has Q = 0 and is ranked by its prior)."""
    q, n, prior = (np.asarray(x, np.float64) for x in (q, n, prior))
    return q + c * prior * np.sqrt(max(float(parent_n), 0.0)) / (1.0 + n)


def option_priors(normalized_logprobs: np.ndarray) -> np.ndarray:
    """Softmax over siblings of their length-normalised option log-probabilities."""
    x = np.asarray(normalized_logprobs, np.float64)
    if x.size == 0:
        return x
    e = np.exp(x - x.max())
    return e / e.sum()


def child_scores(tree: Tree, node: Node, children: list[int], config: MCTSConfig) -> np.ndarray:
    """The selection score of each of `children` (ids of `node`'s children), virtual loss included."""
    stats = [effective_stats(tree.nodes[c], config.virtual_loss) for c in children]
    n = np.array([s[0] for s in stats], np.float64)
    w = np.array([s[1] for s in stats], np.float64)
    q = np.divide(w, n, out=np.zeros_like(w), where=n > 0)
    parent_n, _ = effective_stats(node, config.virtual_loss)
    if config.selection == "uct":
        return uct_scores(q, n, parent_n, config.c_uct, config.uct_form)
    priors = option_priors(np.array([tree.nodes[c].normalized_logprob for c in node.children]))
    prior_of = dict(zip(node.children, priors))
    return puct_scores(q, n, np.array([prior_of[c] for c in children]), parent_n, config.c_uct)


def select_child(tree: Tree, node: Node, config: MCTSConfig, excluded: Collection[int] = ()) -> int | None:
    """The child of `node` to descend into (ties: the earliest child); None when every child is excluded.

    PUCT's priors are normalised over all children of `node`, excluded ones included, so excluding a
    blocked child does not change the others' priors.
    """
    candidates = [c for c in node.children if c not in excluded and not tree.nodes[c].completion]
    if not candidates:
        return None
    scores = child_scores(tree, node, candidates, config)
    return candidates[int(np.argmax(scores))]
