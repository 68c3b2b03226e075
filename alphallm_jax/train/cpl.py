"""Curriculum preference learning (AlphaLLM-CPL section 3.2) and the orderings it is compared with.

At the start of every offline epoch CPL ranks the pair buffer:

* preference reward gap ``r_g = sum_t R(y_w, t) - sum_t R(y_l, t)`` from the fixed critic (the pair
  records' ``reward_gap``): static across epochs;
* policy prediction gap ``p_g = log P(y_w | x) - log P(y_l | x)`` under the *current* policy,
  recomputed every epoch (one batched pass over the buffer);
* both min-max normalised over the buffer (a constant gap normalises to 0), then
  ``w = r_g + alpha * p_g``;
* prompt-level ranking: each prompt's pairs sorted by w (descending), then emitted round-robin over
  the prompts in buffer order (every prompt's 1st pair, then every prompt's 2nd pair, ...), so no
  prompt's pairs are trained all at once.

Orderings (``ordering`` in the config) and the pairs each trains on:
``cpl`` (stepwise + complete pairs, the curriculum above), ``shuffle`` (PL-shuffle: the same pairs
in a fresh random order each epoch), ``complete_only`` (CO: complete pairs, random order),
``q_pairs`` (Q: per-depth highest- vs lowest-Q pairs, random order). Every epoch's order is logged
as a JSONL row in ``order.jsonl`` of the run's directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from alphallm_jax.train.dpo import PreferenceExample, compute_pair_log_probs
from alphallm_jax.utils.io import read_jsonl_tolerant_tail, write_jsonl_atomic

log = logging.getLogger(__name__)

ORDERINGS = ("cpl", "shuffle", "complete_only", "q_pairs")
ORDERING_KINDS: dict[str, tuple[str, ...]] = {
    "cpl": ("stepwise", "complete"), "shuffle": ("stepwise", "complete"),
    "complete_only": ("complete",), "q_pairs": ("q_pair",),
}


def select_pairs(records: Sequence[Mapping[str, Any]], ordering: str) -> list[Mapping[str, Any]]:
    """The pair records ``ordering`` trains on, in buffer order.

    A stepwise pair can be token for token a complete pair (the same prefix node, the two leaves' lowest
    common ancestor, and the same two leaves): such duplicates are kept once (the first).
    """
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering={ordering!r}; choose from {ORDERINGS}")
    kinds = ORDERING_KINDS[ordering]
    seen, out = set(), []
    for r in records:
        if r["kind"] not in kinds:
            continue
        key = (r["problem_id"], r["prefix_node"], r["chosen"]["leaf"], r["rejected"]["leaf"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def normalise(x_n: np.ndarray) -> np.ndarray:
    """Min-max scaling to [0, 1] over the buffer; a constant vector gives zeros."""
    x_n = np.asarray(x_n, np.float64)
    span = float(x_n.max() - x_n.min()) if x_n.size else 0.0
    return np.zeros_like(x_n) if span <= 0.0 else (x_n - x_n.min()) / span


def cpl_weights(reward_gap_n: np.ndarray, policy_gap_n: np.ndarray, alpha: float) -> np.ndarray:
    """``w = norm(r_g) + alpha * norm(p_g)``."""
    return normalise(reward_gap_n) + alpha * normalise(policy_gap_n)


def round_robin_order(groups: Sequence[str], weights_n: np.ndarray) -> np.ndarray:
    """Prompt-level ranking: within each group (prompt) by weight descending (ties: buffer order),
    then round-robin over the groups in order of first appearance."""
    per_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        per_group.setdefault(g, []).append(i)
    queues = [sorted(idx, key=lambda i: (-weights_n[i], i)) for idx in per_group.values()]
    order = [q[k] for k in range(max((len(q) for q in queues), default=0)) for q in queues if k < len(q)]
    return np.asarray(order, np.int64)


def cpl_order(groups: Sequence[str], reward_gap_n: np.ndarray, policy_gap_n: np.ndarray,
              alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(order, w): the CPL order of the buffer and each pair's weight."""
    w_n = cpl_weights(reward_gap_n, policy_gap_n, alpha)
    return round_robin_order(groups, w_n), w_n


class EpochOrder:
    """``trainer.fit(..., epoch_order_fn=EpochOrder(...))``: each epoch's order, logged.

    ``cpl`` computes p_g with the trainer's current parameters (``trainer.current_model()``) in a
    batched jitted pass; the other orderings draw a permutation seeded by (seed, epoch). Each call
    rewrites ``log_path`` with the rows of earlier epochs plus this one (a resumed run that redoes
    an epoch start replaces its row): ``{"epoch", "ordering", "order", "pair_ids"}`` and, for
    ``cpl``, ``"w"``, ``"r_g"``, ``"p_g"`` (raw gaps), all in the emitted order.
    """

    def __init__(self, examples: Sequence[PreferenceExample], ordering: str, *, alpha: float = 0.5,
                 seed: int = 0, log_path: str | os.PathLike | None = None, batch_size: int = 32,
                 collate_fn: Callable | None = None, logits_chunk_size: int | None = None):
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering={ordering!r}; choose from {ORDERINGS}")
        if ordering == "cpl" and collate_fn is None:
            raise ValueError("the cpl ordering needs the collate_fn of the policy pass")
        self.examples = list(examples)
        self.ordering = ordering
        self.alpha = alpha
        self.seed = seed
        self.log_path = log_path
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.logits_chunk_size = logits_chunk_size
        self.groups = [e.group for e in self.examples]
        self.reward_gap_n = np.asarray([e.reward_gap for e in self.examples], np.float64)
        self.calls: list[int] = []  # epochs this object ordered (tests, diagnostics)

    def policy_gap(self, trainer) -> np.ndarray:
        chosen_n, rejected_n = compute_pair_log_probs(
            trainer.current_model(), self.examples, batch_size=self.batch_size,
            collate_fn=self.collate_fn, mesh=trainer.mesh, rules=trainer.rules,
            bucket_window=trainer.cfg.bucket_window, logits_chunk_size=self.logits_chunk_size)
        return chosen_n.astype(np.float64) - rejected_n.astype(np.float64)

    def __call__(self, trainer, epoch: int) -> np.ndarray:
        self.calls.append(epoch)
        row: dict[str, Any] = {"epoch": epoch, "ordering": self.ordering}
        if self.ordering == "cpl":
            p_g = self.policy_gap(trainer)
            order, w_n = cpl_order(self.groups, self.reward_gap_n, p_g, self.alpha)
            row.update(w=w_n[order].tolist(), r_g=self.reward_gap_n[order].tolist(),
                       p_g=p_g[order].tolist())
            log.info("epoch %d: CPL order, mean p_g %.4f", epoch, float(np.mean(p_g)))
        else:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        row.update(order=order.tolist(), pair_ids=[self.examples[i].pair_id for i in order])
        if self.log_path is not None and jax.process_index() == 0:
            rows, _ = read_jsonl_tolerant_tail(self.log_path)
            write_jsonl_atomic(self.log_path, [r for r in rows if r["epoch"] < epoch] + [row])
        return order
