"""Pluggable training losses: ``loss_fn(model, batch) -> (scalar loss, metrics dict)``.

Contract (SFT now; DPO and critic losses plug in the same way):

* ``model`` is the NNX module (parameters already in the compute layout), ``batch`` a dict of
  device arrays with a leading batch dimension (the trainer may also put a PRNG key under
  ``batch["rng"]``; losses that need no randomness ignore it).
* the loss is a *mean* over some units (target tokens for SFT, pairs for DPO); ``metrics["weight"]``
  (optional) is the number of those units in the batch. The trainer uses it to combine
  microbatches (gradient accumulation) and evaluation batches exactly: the accumulated loss is
  ``sum_i w_i * loss_i / sum_i w_i``, which equals the loss of the whole batch at once. Without a
  weight every microbatch counts the same. A loss whose mean has several denominators (the critic's
  three heads over differently many positions, its ranked pairs) instead declares
  ``loss_fn.batch_totals(batch) -> {name: count}``: the step computes those counts over the whole
  batch, gives them to every microbatch (``batch["batch_totals"]``) and adds the shares up, so
  gradient accumulation is exact there too (`train.step`); evaluation batches still combine by
  weight, approximately for such a loss.
* every metric is a scalar; the trainer averages them with the same weights.

Everything that can overflow (logits, log-softmax, sums) runs in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
LossFn = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, Metrics]]

WEIGHT_KEY = "weight"


def shifted_targets(input_ids_bs: jax.Array, loss_mask_bs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Targets for every position: token t+1 is predicted at t; the last position has no target.

    Keeps the full sequence length (so sequence chunks stay aligned) and returns
    (targets [b, s] int32, mask [b, s] float32).
    """
    b = input_ids_bs.shape[0]
    targets = jnp.concatenate([input_ids_bs[:, 1:], jnp.zeros((b, 1), input_ids_bs.dtype)], axis=1)
    mask = jnp.concatenate([loss_mask_bs[:, 1:], jnp.zeros((b, 1), loss_mask_bs.dtype)], axis=1)
    return targets.astype(jnp.int32), mask.astype(jnp.float32)


def token_nll_and_correct(logits_bsv: jax.Array, targets_bs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood (float32) and whether the argmax equals the target."""
    logits = logits_bsv.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_bs[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets_bs)
    return lse - target_logit, correct


def _chunked_nll(model, hidden_bsd: jax.Array, targets_bs: jax.Array, chunk: int):
    """Sums over sequence chunks without materialising [b, s, vocab] logits (rematerialised). A length
    that is not a multiple of `chunk` (batches are padded to `pad_to_multiple`, not to the chunk) is
    padded up to one; the padded positions' values are dropped."""
    b, s, d = hidden_bsd.shape
    chunk = min(chunk, s)  # a short batch is one chunk, not one padded up to the configured size
    n = -(-s // chunk)
    if n * chunk != s:
        hidden_bsd = jnp.pad(hidden_bsd, ((0, 0), (0, n * chunk - s), (0, 0)))
        targets_bs = jnp.pad(targets_bs, ((0, 0), (0, n * chunk - s)))
    h_cbkd = hidden_bsd.reshape(b, n, chunk, d).swapaxes(0, 1)
    t_cbk = targets_bs.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(h_bkd, t_bk):
        return token_nll_and_correct(model.logits_from_hidden(h_bkd), t_bk)

    def body(carry, xs):
        return carry, one(*xs)

    _, (nll, correct) = jax.lax.scan(body, None, (h_cbkd, t_cbk))
    return nll.swapaxes(0, 1).reshape(b, n * chunk)[:, :s], correct.swapaxes(0, 1).reshape(b, n * chunk)[:, :s]


def token_nll(model, batch: dict[str, jax.Array], *,
              logits_chunk_size: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(nll [b, s], correct [b, s], mask [b, s]) of each target token of ``batch``.

    ``batch`` holds ``input_ids`` and ``loss_mask`` (and optionally ``positions``, -1 on padding).
    """
    input_ids = batch["input_ids"]
    targets, mask = shifted_targets(input_ids, batch["loss_mask"])
    positions = batch.get("positions")
    if logits_chunk_size:
        hidden, _ = model.hidden_states(input_ids, positions_bs=positions)
        nll, correct = _chunked_nll(model, hidden, targets, logits_chunk_size)
    else:
        logits = model(input_ids, positions_bs=positions)
        nll, correct = token_nll_and_correct(logits, targets)
    return nll, correct, mask


def sft_loss(model, batch: dict[str, jax.Array], *,
             logits_chunk_size: int | None = None) -> tuple[jax.Array, Metrics]:
    """Cross-entropy on response tokens only: the mean over target tokens (``loss_mask``).

    Metrics: ``loss``, ``token_accuracy`` (argmax == target over target tokens) and ``weight`` (the
    number of target tokens). A batch with no target token has loss 0 and weight 0.
    """
    nll, correct, mask = token_nll(model, batch, logits_chunk_size=logits_chunk_size)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    loss = jnp.sum(nll * mask) / denom
    accuracy = jnp.sum(correct.astype(jnp.float32) * mask) / denom
    return loss, {"loss": loss, "token_accuracy": accuracy, WEIGHT_KEY: count}


def make_sft_loss(logits_chunk_size: int | None = None) -> LossFn:
    """``sft_loss`` with its options bound. ``logits_chunk_size`` computes the vocabulary projection
    and softmax in sequence chunks of that size, recomputed in the backward pass, so the full
    ``[batch, seq, vocab]`` logits never exist at once (large vocabularies, long sequences)."""
    if logits_chunk_size is None:
        return sft_loss
    return functools.partial(sft_loss, logits_chunk_size=logits_chunk_size)


def sequence_log_probs(model, batch: dict[str, jax.Array], *,
                       logits_chunk_size: int | None = None) -> jax.Array:
    """Sum of log p(target) over each row's target tokens (``loss_mask``): float32 [b].

    The building block of DPO and of CPL's policy-prediction gap.
    """
    nll, _, mask = token_nll(model, batch, logits_chunk_size=logits_chunk_size)
    return -jnp.sum(nll * mask, axis=-1)
