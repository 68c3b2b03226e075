"""DPO on trajectory pairs with the shared trainer, the reference computed once and cached.

``L = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``, ``z = beta * [(log pi(y_w|x) - log ref(y_w|x))
- (log pi(y_l|x) - log ref(y_l|x))]``, the log-probabilities summed over response tokens only;
``eps = label_smoothing`` (conservative DPO; 0: plain DPO). With ``nll_weight`` > 0 the loss adds that
weight times the chosen response's mean token negative log-likelihood (DPO with an NLL term on the
winner, as in iterative reasoning preference optimisation): plain DPO can win its margin by lowering
both responses' likelihood, which on reasoning traces lowers the chosen one too. ``loss_type="ipo"``
replaces the logistic loss by IPO's squared one, ``L = (h - 1/(2 beta))^2`` with ``h = z / beta`` the
summed log-ratio gap: the margin is pulled to a fixed target instead of pushed without bound, so the
rejected side cannot be driven down for ever once the pair is already ranked.

The reference model is the policy at the start of preference learning. Its log-probabilities do not
change, so ``with_reference`` computes them once, in one unshuffled batched jitted pass, and stores
them in the examples (and in a cache file beside the pairs): no second model sits in memory while
training. A paired batch holds both sides of each pair with one common length::

    chosen_input_ids / rejected_input_ids   [B, L] int32  prompt + response, right-padded
    chosen_loss_mask / rejected_loss_mask   [B, L] int32  1 on response tokens
    chosen_positions / rejected_positions   [B, L] int32  0..n-1, -1 on padding
    ref_chosen_logp / ref_rejected_logp     [B]    float32
    row_mask                                [B]    int32  0 on filler rows

and the loss runs chosen and rejected through the model in one forward pass of 2B rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from alphallm_jax.models.sharding import ShardingRules, batch_shards, logical_to_spec
from alphallm_jax.train.batching import Batch, BatchIterator, padded_length
from alphallm_jax.train.losses import WEIGHT_KEY, LossFn, Metrics, sequence_log_probs
from alphallm_jax.utils.distributed import broadcast_int, coordinator_array, fetch
from alphallm_jax.utils.io import read_jsonl_tolerant_tail, write_jsonl_atomic
from alphallm_jax.utils.shapes import round_up

SIDES = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """One pair: ``chosen_ids`` preferred to ``rejected_ids`` after ``prompt_ids``.

    ``group`` is the prompt the pair came from (CPL ranks pairs within a prompt); ``reward_gap`` is
    CPL's r_g from the fixed critic; the reference log-probabilities are filled by ``with_reference``.
    """

    pair_id: str
    group: str
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    kind: str = ""
    reward_gap: float = 0.0
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def preference_length(x: PreferenceExample) -> int:
    return len(x)


def collate_preference(examples: Sequence[PreferenceExample], num_rows: int, *,
                       max_seq_len: int | None = None, pad_to_multiple: int = 64,
                       fixed_length: bool = False, pad_id: int = 0) -> Batch:
    """A paired batch of ``num_rows`` rows (module doc); sequences longer than ``max_seq_len`` keep
    their first tokens. Missing reference log-probabilities read as 0."""
    if len(examples) > num_rows:
        raise ValueError(f"{len(examples)} examples for a batch of {num_rows} rows")
    longest = max((len(e) for e in examples), default=1)
    length = padded_length(longest, max_seq_len=max_seq_len, pad_to_multiple=pad_to_multiple,
                           fixed=fixed_length)
    out: Batch = {}
    for side in SIDES:
        input_ids = np.full((num_rows, length), pad_id, np.int32)
        loss_mask = np.zeros((num_rows, length), np.int32)
        positions = np.full((num_rows, length), -1, np.int32)
        for i, e in enumerate(examples):
            tokens = (e.prompt_ids + getattr(e, f"{side}_ids"))[:length]
            n = len(tokens)
            input_ids[i, :n] = tokens
            loss_mask[i, len(e.prompt_ids):n] = 1
            positions[i, :n] = np.arange(n)
        out[f"{side}_input_ids"], out[f"{side}_loss_mask"], out[f"{side}_positions"] = (
            input_ids, loss_mask, positions)
        ref = np.zeros((num_rows,), np.float32)
        for i, e in enumerate(examples):
            value = getattr(e, f"ref_{side}_logp")
            ref[i] = 0.0 if value is None else value
        out[f"ref_{side}_logp"] = ref
    row_mask = np.zeros((num_rows,), np.int32)
    row_mask[:len(examples)] = 1
    out["row_mask"] = row_mask
    return out


def make_collate(*, max_seq_len: int | None, pad_to_multiple: int, fixed_length: bool = False,
                 pad_id: int = 0) -> Callable[[Sequence[PreferenceExample], int], Batch]:
    return functools.partial(collate_preference, max_seq_len=max_seq_len,
                             pad_to_multiple=pad_to_multiple, fixed_length=fixed_length, pad_id=pad_id)


# ------------------------------------------------------------------------------------ the loss
def pair_log_probs(model, batch: dict[str, jax.Array], *,
                   logits_chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(log pi(chosen | prompt) [B], log pi(rejected | prompt) [B]), summed over response tokens,
    from one forward pass over the 2B concatenated rows."""
    both = {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
            for k in ("input_ids", "loss_mask", "positions")}
    logp_2b = sequence_log_probs(model, both, logits_chunk_size=logits_chunk_size)
    b = batch["chosen_input_ids"].shape[0]
    return logp_2b[:b], logp_2b[b:]


LOSS_TYPES = ("sigmoid", "ipo")


def dpo_terms(policy_chosen_b: jax.Array, policy_rejected_b: jax.Array, ref_chosen_b: jax.Array,
              ref_rejected_b: jax.Array, *, beta: float, label_smoothing: float = 0.0,
              loss_type: str = "sigmoid") -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss [B], chosen reward [B], rejected reward [B]); reward = beta * (log pi - log ref).
    ``loss_type``: "sigmoid" (DPO, with conservative label smoothing) or "ipo" (squared, target gap
    ``1 / (2 beta)`` in summed log-ratio units)."""
    check_loss_type(loss_type, label_smoothing)
    chosen_reward_b = beta * (policy_chosen_b - ref_chosen_b)
    rejected_reward_b = beta * (policy_rejected_b - ref_rejected_b)
    z_b = chosen_reward_b - rejected_reward_b
    if loss_type == "ipo":
        loss_b = jnp.square(z_b / beta - 0.5 / beta)
    else:
        loss_b = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(z_b)
                  - label_smoothing * jax.nn.log_sigmoid(-z_b))
    return loss_b, chosen_reward_b, rejected_reward_b


def check_loss_type(loss_type: str, label_smoothing: float = 0.0) -> None:
    """Fails on an unknown ``policy_train.preference_loss`` or label smoothing with IPO (which has none)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"policy_train.preference_loss={loss_type!r}; choose from {LOSS_TYPES}")
    if loss_type == "ipo" and label_smoothing:
        raise ValueError("policy_train.label_smoothing applies to the sigmoid DPO loss only; "
                         "set it to 0 with policy_train.preference_loss='ipo'")


def dpo_loss(model, batch: dict[str, jax.Array], *, beta: float, label_smoothing: float = 0.0,
             nll_weight: float = 0.0, logits_chunk_size: int | None = None,
             loss_type: str = "sigmoid") -> tuple[jax.Array, Metrics]:
    """Mean DPO loss over the batch's real pairs (``row_mask``), plus ``nll_weight`` times the chosen
    responses' mean per-token NLL; ``metrics["weight"]`` = pairs.

    Metrics: ``loss``, ``dpo_loss``, ``chosen_nll`` (per token), ``reward_accuracy`` (chosen reward >
    rejected reward), ``chosen_reward``, ``rejected_reward``, ``margin`` (their difference),
    ``logp_chosen``, ``logp_rejected``.
    """
    logp_chosen_b, logp_rejected_b = pair_log_probs(model, batch, logits_chunk_size=logits_chunk_size)
    loss_b, chosen_b, rejected_b = dpo_terms(
        logp_chosen_b, logp_rejected_b, batch["ref_chosen_logp"].astype(jnp.float32),
        batch["ref_rejected_logp"].astype(jnp.float32), beta=beta, label_smoothing=label_smoothing,
        loss_type=loss_type)
    row_b = batch["row_mask"].astype(jnp.float32)
    count = jnp.sum(row_b)
    inv = 1.0 / jnp.maximum(count, 1.0)

    def mean(x_b):
        return jnp.sum(x_b * row_b) * inv

    chosen_tokens_b = jnp.sum(batch["chosen_loss_mask"].astype(jnp.float32), axis=-1)
    chosen_nll = mean(-logp_chosen_b / jnp.maximum(chosen_tokens_b, 1.0))
    dpo = mean(loss_b)
    loss = dpo + nll_weight * chosen_nll if nll_weight else dpo
    return loss, {
        "loss": loss, "dpo_loss": dpo, "chosen_nll": chosen_nll,
        "reward_accuracy": mean((chosen_b > rejected_b).astype(jnp.float32)),
        "chosen_reward": mean(chosen_b), "rejected_reward": mean(rejected_b),
        "margin": mean(chosen_b - rejected_b), "logp_chosen": mean(logp_chosen_b),
        "logp_rejected": mean(logp_rejected_b), WEIGHT_KEY: count,
    }


@functools.lru_cache(maxsize=32)
def make_dpo_loss(beta: float, label_smoothing: float = 0.0, logits_chunk_size: int | None = None,
                  nll_weight: float = 0.0, loss_type: str = "sigmoid") -> LossFn:
    """``dpo_loss`` with its options bound; the same options give the same function object, so
    the trainer's compiled step is reused across runs."""
    check_loss_type(loss_type, label_smoothing)
    return functools.partial(dpo_loss, beta=float(beta), label_smoothing=float(label_smoothing),
                             nll_weight=float(nll_weight), logits_chunk_size=logits_chunk_size,
                             loss_type=loss_type)


# ------------------------------------------------------------------ batched log-probability pass
_LOGP_FNS: dict[tuple, Any] = {}  # jitted passes by (model graph, chunking): no recompiles per epoch
_LOGP_FNS_SIZE = 8


def _logp_fn(graphdef: nnx.GraphDef, logits_chunk_size: int | None):
    key = (graphdef, logits_chunk_size)
    if key not in _LOGP_FNS:
        def fn(state, batch):
            return pair_log_probs(nnx.merge(graphdef, state), batch, logits_chunk_size=logits_chunk_size)

        if len(_LOGP_FNS) >= _LOGP_FNS_SIZE:
            _LOGP_FNS.pop(next(iter(_LOGP_FNS)))
        _LOGP_FNS[key] = jax.jit(fn)
    return _LOGP_FNS[key]


def compute_pair_log_probs(model, examples: Sequence[PreferenceExample], *, batch_size: int,
                           collate_fn: Callable[[Sequence[PreferenceExample], int], Batch],
                           mesh: jax.sharding.Mesh | None = None, rules: ShardingRules | None = None,
                           bucket_window: int = 32,
                           logits_chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(log pi(chosen) [n], log pi(rejected) [n]) of every example under ``model``, float32, in the
    examples' order: one jitted forward per batch, no shuffling (length-sorted within windows of
    ``bucket_window`` batches to cut padding). With a mesh the rows are split over (data, fsdp)."""
    batch_size = round_up(batch_size, batch_shards(mesh))
    rules = rules if rules is not None else ShardingRules()
    graphdef, state = nnx.split(model)
    fn = _logp_fn(graphdef, logits_chunk_size)
    it = BatchIterator(examples, batch_size=batch_size, collate_fn=collate_fn,
                       length_fn=preference_length, shuffle=False, bucket_window=bucket_window)
    chosen_n = np.zeros((len(examples),), np.float32)
    rejected_n = np.zeros((len(examples),), np.float32)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for step, rows in enumerate(it.epoch_plan(0)):
            batch = it.get_batch(0, step)
            if mesh is not None:  # every process holds the whole host batch; devices take their rows
                batch = {k: jax.make_array_from_callback(
                    v.shape, NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (v.ndim - 1), rules)),
                    lambda idx, v=v: v[idx]) for k, v in batch.items()}
            chosen_b, rejected_b = fetch(fn(state, batch))  # rows of every host
            chosen_n[rows] = chosen_b[:len(rows)]
            rejected_n[rows] = rejected_b[:len(rows)]
    return chosen_n, rejected_n


def _fingerprint(e: PreferenceExample, max_seq_len: int | None) -> str:
    """The tokens a cached reference value covers (after truncation to ``max_seq_len``)."""
    cap = max_seq_len or None
    text = json.dumps([list(e.prompt_ids + e.chosen_ids)[:cap], list(e.prompt_ids + e.rejected_ids)[:cap],
                       len(e.prompt_ids)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def with_reference(model, examples: Sequence[PreferenceExample], *, batch_size: int,
                   max_seq_len: int | None, pad_to_multiple: int, pad_id: int = 0,
                   mesh: jax.sharding.Mesh | None = None, rules: ShardingRules | None = None,
                   cache_path: str | os.PathLike | None = None, bucket_window: int = 32,
                   logits_chunk_size: int | None = None) -> list[PreferenceExample]:
    """The examples with ``model``'s (the reference's) log-probabilities filled in.

    With ``cache_path``: read from it when it holds every pair with the same tokens (a rerun, or a
    resumed run whose policy has moved on), else computed and written there atomically as JSONL rows
    ``{pair_id, tokens (a hash of what was scored), ref_chosen_logp, ref_rejected_logp}``.
    """
    wanted = {e.pair_id: _fingerprint(e, max_seq_len) for e in examples}
    if cache_path is not None:
        rows, _ = read_jsonl_tolerant_tail(cache_path)
        cached = {r["pair_id"]: r for r in rows}
        hit = all(pid in cached and cached[pid]["tokens"] == fp for pid, fp in wanted.items())
        # Process 0's reading decides, and its values are used, on every process: computing the values is a
        # collective over the mesh, which processes seeing the shared file differently must not split on.
        if broadcast_int(hit):
            values = np.asarray([[cached[e.pair_id]["ref_chosen_logp"], cached[e.pair_id]["ref_rejected_logp"]]
                                 if hit else [0.0, 0.0] for e in examples], np.float64).reshape(-1, 2)
            values = coordinator_array(values)
            return [dataclasses.replace(e, ref_chosen_logp=float(c), ref_rejected_logp=float(r))
                    for e, (c, r) in zip(examples, values)]
    collate = make_collate(max_seq_len=max_seq_len, pad_to_multiple=pad_to_multiple, pad_id=pad_id)
    chosen_n, rejected_n = compute_pair_log_probs(
        model, examples, batch_size=batch_size, collate_fn=collate, mesh=mesh, rules=rules,
        bucket_window=bucket_window, logits_chunk_size=logits_chunk_size)
    out = [dataclasses.replace(e, ref_chosen_logp=float(c), ref_rejected_logp=float(r))
           for e, c, r in zip(examples, chosen_n, rejected_n, strict=True)]
    if cache_path is not None and jax.process_index() == 0:
        write_jsonl_atomic(cache_path, [
            {"pair_id": e.pair_id, "tokens": wanted[e.pair_id], "ref_chosen_logp": e.ref_chosen_logp,
             "ref_rejected_logp": e.ref_rejected_logp} for e in out])
    return out
