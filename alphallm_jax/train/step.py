"""The pure, jittable pieces of a train step: microbatch gradient accumulation, the optimizer
update (learning rate and weight decay as inputs) with a non-finite guard, and evaluation.

Functions here take and return plain pytrees (the model's ``nnx.State`` of parameters, the optax
state, batches of arrays); the ``Trainer`` jits them with shardings and donation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from alphallm_jax.train.losses import WEIGHT_KEY, LossFn
from alphallm_jax.train.optim import decay_mask

RNG_KEY = "rng"
TOTALS_KEY = "batch_totals"  # where a microbatch receives the whole batch's totals (see below)


def split_microbatches(batch: dict[str, jax.Array], num_micro: int) -> dict[str, jax.Array]:
    """[B, ...] -> [num_micro, B / num_micro, ...]; microbatch i holds rows i, i + n, i + 2n, ...

    The strided split keeps each microbatch spread over every data-parallel shard (the reshape to
    [B / n, n] leaves the sharded dimension first), so no rows move between devices.
    """
    def split(x):
        b = x.shape[0]
        if b % num_micro:
            raise ValueError(f"batch of {b} rows does not split into {num_micro} microbatches")
        return x.reshape(b // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)

    return {k: split(v) for k, v in batch.items()}


def _loss_weight(metrics: dict[str, jax.Array]) -> jax.Array:
    w = metrics.get(WEIGHT_KEY)
    return jnp.asarray(1.0 if w is None else w, jnp.float32)


def batch_totals_fn(loss_fn: LossFn) -> Callable | None:
    """``loss_fn.batch_totals`` when the loss has one: ``batch_totals(batch) -> {name: scalar}``, the
    counts a loss normalises by when one weight cannot stand for them all (the critic's heads average
    over differently many positions). A loss that has it reads the totals under ``batch[TOTALS_KEY]``
    when they are there and divides by them instead of by its own batch's counts."""
    return getattr(loss_fn, "batch_totals", None)


def accumulated_loss_and_grads(loss_and_grad: Callable, params: Any, batch: dict[str, jax.Array],
                               num_micro: int, rng: jax.Array | None = None,
                               batch_totals: Callable | None = None):
    """((loss, metrics), grads) over ``num_micro`` microbatches, equal to the whole batch's.

    ``loss_and_grad(params, batch) -> ((loss, metrics), grads)``. By default the microbatches combine
    by the losses' weights w_i (``metrics["weight"]``, default 1): loss = sum w_i loss_i / W, grads =
    sum w_i g_i / W and each metric is the same weighted mean, with ``metrics["weight"] = W``; for a
    loss that is a mean over w_i units (a token mean, DPO's pair mean) this is the whole batch's loss.
    With ``batch_totals`` (``batch_totals_fn``) the totals are computed over the whole batch and given
    to every microbatch, whose loss, gradient and metrics are then its share of the whole batch's:
    they are summed (``metrics["weight"]`` too). Runs as a ``lax.scan``: one microbatch of
    activations lives at a time. With one microbatch the loss sees the batch as it is.
    """
    totals = batch_totals(batch) if batch_totals is not None and num_micro > 1 else None

    def prepared(mb, i):
        mb = mb if rng is None else {**mb, RNG_KEY: jax.random.fold_in(rng, i)}
        return mb if totals is None else {**mb, TOTALS_KEY: totals}

    if num_micro == 1:
        return loss_and_grad(params, prepared(batch, 0))

    micro = split_microbatches(batch, num_micro)
    first = jax.tree.map(lambda x: x[0], micro)
    (_, metrics_shape), _ = jax.eval_shape(loss_and_grad, params, prepared(first, 0))

    def body(carry, xs):
        grads_acc, loss_acc, metrics_acc, weight_acc = carry
        i, mb = xs
        (loss, metrics), grads = loss_and_grad(params, prepared(mb, i))
        w = _loss_weight(metrics)
        a = w if totals is None else jnp.ones_like(w)  # shares of one whole-batch loss just add up
        grads_acc = jax.tree.map(lambda acc, g: acc + a * g.astype(acc.dtype), grads_acc, grads)
        metrics_acc = {k: metrics_acc[k] + a * jnp.asarray(v, jnp.float32)
                       for k, v in metrics.items() if k != WEIGHT_KEY}
        return (grads_acc, loss_acc + a * loss.astype(jnp.float32), metrics_acc, weight_acc + w), None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, params), zero,
            {k: zero for k in metrics_shape if k != WEIGHT_KEY}, zero)
    (grads, loss, metrics, weight), _ = jax.lax.scan(
        body, init, (jnp.arange(num_micro), micro))
    if totals is None:
        has_weight = weight > 0
        inv = jnp.where(has_weight, 1.0 / jnp.where(has_weight, weight, 1.0), 0.0)
        grads = jax.tree.map(lambda g: (g * inv).astype(g.dtype), grads)
        metrics = {k: v * inv for k, v in metrics.items()}
        loss = loss * inv
    if WEIGHT_KEY in metrics_shape:
        metrics[WEIGHT_KEY] = weight
    return (loss, metrics), grads


def make_loss_and_grad(graphdef: nnx.GraphDef, rest: Any, loss_fn: LossFn) -> Callable:
    """(params, batch) -> ((loss, metrics), grads): merges the model and differentiates ``loss_fn``."""
    def loss_of_params(params, batch):
        model = nnx.merge(graphdef, params, rest)
        loss, metrics = loss_fn(model, batch)
        return loss.astype(jnp.float32), metrics

    return jax.value_and_grad(loss_of_params, has_aux=True)


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    grad_accum_steps: int = 1):
    """``step(params, opt_state, rest, batch, learning_rate, weight_decay, rng) -> (params, opt_state,
    metrics)``.

    ``tx`` gives the updates of a unit learning rate and no weight decay (build it with learning rate 1
    and weight decay 0); the step adds decoupled weight decay on ``optim.decay_mask``'s parameters and
    scales by ``learning_rate``: ``updates = learning_rate * (unit_updates - weight_decay * params)``,
    what optax's AdamW does with a schedule. Both are float32 scalar arguments rather than constants
    of the program, so one compiled step serves every schedule, run length and decay (a loop's base
    training and SFT rounds share theirs).

    A step whose loss or gradient norm is not finite applies no update (parameters and optimizer
    state come back unchanged) and reports ``metrics["finite"] = False``; the trainer then stops.
    """
    def train_step(params, opt_state, rest, batch, learning_rate, weight_decay, rng):
        loss_and_grad = make_loss_and_grad(graphdef, rest, loss_fn)
        (loss, metrics), grads = accumulated_loss_and_grads(
            loss_and_grad, params, batch, grad_accum_steps, rng, batch_totals_fn(loss_fn))
        grad_norm = optax.tree.norm(grads)
        unit_updates, new_opt_state = tx.update(grads, opt_state, params)

        def scaled(update, param, decayed):
            if decayed:  # decoupled weight decay (PyTorch's AdamW convention), scaled by the rate
                update = update - jnp.asarray(weight_decay, update.dtype) * param
            return jnp.asarray(learning_rate, update.dtype) * update

        updates = jax.tree.map(scaled, unit_updates, params, decay_mask(params))
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_params = jax.tree.map(keep, new_params, params)
        new_opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "finite": finite,
                   "learning_rate": jnp.asarray(learning_rate, jnp.float32)}
        return new_params, new_opt_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, loss_fn: LossFn):
    """``eval_step(params, rest, batch) -> metrics`` (with ``loss`` and, if the loss gives one,
    ``weight``)."""
    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        loss, metrics = loss_fn(model, batch)
        return {**metrics, "loss": loss.astype(jnp.float32)}

    return eval_step


def sum_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Host-side sum of per-batch metrics that are shares of one whole (a loss given ``TOTALS_KEY``)."""
    return {k: sum(float(r[k]) for r in rows) for k in rows[0]} if rows else {}


def combine_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """Host-side weighted mean of per-batch metrics (by ``weight``, default 1); ``weight`` summed."""
    if not rows:
        return {}
    weights = [float(r.get(WEIGHT_KEY, 1.0)) for r in rows]
    total = sum(weights)
    out = {}
    for k in rows[0]:
        if k == WEIGHT_KEY:
            continue
        out[k] = (sum(w * float(r[k]) for w, r in zip(weights, rows, strict=True)) / total) if total > 0 else 0.0
    if any(WEIGHT_KEY in r for r in rows):
        out[WEIGHT_KEY] = total
    return out
