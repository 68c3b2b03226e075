"""Critic losses for the shared trainer: one pass, three heads, a target and a mask per head.

Batch layout (right-padded by `collate_critic`; every key is [B, L] except `row_mask` [B]):

    input_ids        int32    prompt then solution tokens, pad elsewhere
    positions        int32    0..n-1 on real tokens, -1 on padding (masked out of attention)
    value_target     float32  v(s) of the prefix ending at this token (MC estimate, in [0, 1])
    value_mask       float32  1 where a value target sits (the last token of a state), else 0
    prm_target/_mask float32  soft step label at the last token of each step
    orm_target/_mask float32  0/1 outcome at the last token of a complete solution

Each head's loss is its mean over its masked positions (binary cross-entropy on the sigmoid of the
head's logit, soft targets allowed; the value head may use squared error instead); the total is the
weighted sum of the three. Heads read hidden states at their own positions, so a row may carry any
subset of the three kinds of labels (an ORM-only rollout row has zero value and PRM masks).

Pair batches (every key also under `b_`: a second solution of the same prompt) run as one forward
over 2B rows and add a Bradley-Terry ranking term on the ORM: BCE alone lets the ORM score how hard a
prompt is, while reranking k solutions of one prompt needs the within-prompt order.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alphallm_jax.models.critic import HEADS
from alphallm_jax.train.batching import collate_dicts
from alphallm_jax.train.losses import WEIGHT_KEY, LossFn
from alphallm_jax.train.step import TOTALS_KEY

VALUE_LOSSES = ("bce", "mse")
PAIR_PREFIX = "b_"  # the second solution of a pair example (`critics.data.pair_within_prompts`)
PAD_VALUES = {"positions": -1, PAIR_PREFIX + "positions": -1}


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-(t log sigmoid(x) + (1 - t) log sigmoid(-x)), stable for any x; t may be soft."""
    return jax.nn.softplus(logits) - targets * logits


def head_losses(logits_bsc: jax.Array, batch: Mapping[str, jax.Array], *, value_loss: str = "bce",
                totals: Mapping[str, jax.Array] | None = None) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per head: (masked mean loss, number of labelled positions). With `totals` (`label_totals` of
    the whole batch this one is a microbatch of) the sum is divided by the whole batch's count."""
    out = {}
    for c, head in enumerate(HEADS):
        logits_bs = logits_bsc[..., c]
        target_bs = batch[f"{head}_target"].astype(jnp.float32)
        mask_bs = batch[f"{head}_mask"].astype(jnp.float32)
        if head == "value" and value_loss == "mse":
            per_bs = jnp.square(jax.nn.sigmoid(logits_bs) - target_bs)
        else:
            per_bs = bce_with_logits(logits_bs, target_bs)
        count = jnp.sum(mask_bs)
        out[head] = (jnp.sum(per_bs * mask_bs) / jnp.maximum(count if totals is None else totals[head], 1.0),
                     count)
    return out


def _unpair(batch: Mapping[str, jax.Array]) -> tuple[dict[str, jax.Array], int]:
    """A pair batch (second solution under `b_` keys) as one batch of 2B rows (first halves first)."""
    if PAIR_PREFIX + "input_ids" not in batch:
        return dict(batch), 0
    keys = [k for k in batch if not k.startswith(PAIR_PREFIX) and PAIR_PREFIX + k in batch]
    flat = {k: jnp.concatenate([batch[k], batch[PAIR_PREFIX + k]], axis=0) for k in keys}
    flat["row_mask"] = jnp.concatenate([batch["row_mask"], batch["row_mask"]], axis=0)
    return flat, batch["input_ids"].shape[0]


def _ranked_pairs(target_bs: jax.Array, mask_bs: jax.Array, pairs: int) -> jax.Array:
    """bool[pairs]: the pairs (rows i and pairs + i) whose solutions both carry an ORM label and differ in
    outcome; the labels alone set them."""
    target_b = jnp.sum(target_bs * mask_bs, axis=1)
    has_b = jnp.sum(mask_bs, axis=1) > 0
    return has_b[:pairs] & has_b[pairs:] & (jnp.abs(target_b[:pairs] - target_b[pairs:]) > 0.5)


def rank_loss(orm_logits_bs: jax.Array, target_bs: jax.Array, mask_bs: jax.Array, pairs: int,
              total: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Bradley-Terry loss -log sigmoid(l_right - l_wrong) on the ORM logits of each pair (rows i and
    pairs + i) whose outcomes differ: (mean loss, number of such pairs); the mean over `total` pairs
    when given (the whole batch's, `label_totals`)."""
    logit_b = jnp.sum(orm_logits_bs * mask_bs, axis=1)
    target_b = jnp.sum(target_bs * mask_bs, axis=1)
    la, lb, ta, tb = logit_b[:pairs], logit_b[pairs:], target_b[:pairs], target_b[pairs:]
    valid = _ranked_pairs(target_bs, mask_bs, pairs)
    margin = jnp.where(ta > tb, la - lb, lb - la)
    count = jnp.sum(valid.astype(jnp.float32))
    return (jnp.sum(jnp.where(valid, jax.nn.softplus(-margin), 0.0))
            / jnp.maximum(count if total is None else total, 1.0), count)


def label_totals(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """What `critic_loss` divides by, over a whole batch: each head's labelled positions (the ORM's
    also for its accuracy) and, for pair batches, the ranked pairs. The train step computes them
    before splitting a batch into microbatches (`train.step.accumulated_loss_and_grads`), so the
    microbatches' losses are shares that add up to the whole batch's. Pairs stay whole there: both
    solutions of a pair sit in one row of the batch, and microbatches are sets of rows."""
    flat, pairs = _unpair(batch)
    totals = {h: jnp.sum(flat[f"{h}_mask"].astype(jnp.float32)) for h in HEADS}
    if pairs:
        ranked = _ranked_pairs(flat["orm_target"], flat["orm_mask"], pairs)
        totals["ranked_pairs"] = jnp.sum(ranked.astype(jnp.float32))
    return totals


def critic_loss(model, batch: dict[str, jax.Array], *, head_weights: Sequence[float] = (1.0, 1.0, 1.0),
                value_loss: str = "bce", rank_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of the per-head losses (+ `rank_weight` times the ORM ranking loss of pair
    batches); metrics per head; weight = real, labelled rows (solutions).

    Each head's loss is a mean over its labelled positions, whose count per row varies, so no one
    weight per batch combines batches exactly (4 rows holding 10, 1, 10 and 1 value labels, split in
    two and combined by rows: loss 1.38732 against 1.38702). Under gradient accumulation the step
    therefore passes the whole batch's counts (`label_totals`, under `batch[TOTALS_KEY]`): every mean
    here divides by those instead, and the microbatches' losses, gradients and metrics add up to the
    whole batch's exactly; `Trainer.evaluate` passes a dev set's totals to each of its batches the same way.
    """
    batch = dict(batch)
    totals = batch.pop(TOTALS_KEY, None)
    batch, pairs = _unpair(batch)
    logits_bsc = model(batch["input_ids"], positions_bs=batch["positions"])
    per_head = head_losses(logits_bsc, batch, value_loss=value_loss, totals=totals)
    loss = sum(w * per_head[h][0] for w, h in zip(head_weights, HEADS, strict=True))
    metrics = {f"{h}_loss": per_head[h][0] for h in HEADS}
    # ORM accuracy at 0.5 (targets are 0/1 there): a readable training signal.
    orm_logits, orm_target, orm_mask = logits_bsc[..., HEADS.index("orm")], batch["orm_target"], batch["orm_mask"]
    hit = ((orm_logits > 0) == (orm_target > 0.5)).astype(jnp.float32)
    metrics["orm_accuracy"] = jnp.sum(hit * orm_mask) / jnp.maximum(
        jnp.sum(orm_mask) if totals is None else totals["orm"], 1.0)
    if pairs:
        ranked, count = rank_loss(orm_logits, orm_target, orm_mask, pairs,
                                  None if totals is None else totals["ranked_pairs"])
        loss = loss + rank_weight * ranked
        metrics["orm_rank_loss"], metrics["ranked_pairs"] = ranked, count
    # Weight: solutions that carry a label (a pair's label-free stand-in for a missing partner does not count).
    labelled_b = sum(jnp.sum(batch[f"{h}_mask"], axis=1) for h in HEADS) > 0
    metrics[WEIGHT_KEY] = jnp.sum(batch["row_mask"] * labelled_b).astype(jnp.float32)
    return loss, metrics


def make_critic_loss(head_weights: Sequence[float] = (1.0, 1.0, 1.0), value_loss: str = "bce",
                     rank_weight: float = 0.0) -> LossFn:
    """`critic_loss` with its options bound (a new function object: the trainer keys compiles on it)."""
    if value_loss not in VALUE_LOSSES:
        raise ValueError(f"critics.loss.value={value_loss!r}; choose from {VALUE_LOSSES}")
    if len(head_weights) != len(HEADS):
        raise ValueError(f"need {len(HEADS)} head weights ({HEADS}), got {tuple(head_weights)}")
    loss_fn = functools.partial(critic_loss, head_weights=tuple(float(w) for w in head_weights),
                                value_loss=value_loss, rank_weight=float(rank_weight))
    loss_fn.batch_totals = label_totals  # exact gradient accumulation (`train.step.batch_totals_fn`)
    return loss_fn


def collate_critic(examples: Sequence[Mapping[str, Any]], num_rows: int, *, max_seq_len: int | None = None,
                   pad_to_multiple: int = 32) -> dict[str, np.ndarray]:
    """Right-padded critic batch (positions -1 on padding, all masks 0 there)."""
    return collate_dicts(examples, num_rows, max_seq_len=max_seq_len, pad_to_multiple=pad_to_multiple,
                         pad_values=PAD_VALUES)


def critic_example_length(example: Mapping[str, Any]) -> int:
    return len(example["input_ids"])
