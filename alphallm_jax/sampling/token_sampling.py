"""Per-row next-token sampling: temperature, top-k, top-p, greedy, and untempered log-probabilities.

Every row carries its own settings and its own PRNG key, so a row's sample depends only on its own
seed and step, never on which other rows share the batch (batched search equals sequential search).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seed_b: jax.Array, step_b: jax.Array) -> jax.Array:
    """One raw PRNG key per row from (row seed, row step): `uint32[B, 2]`."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seed_b, step_b)


SAMPLING_MODES = ("greedy", "sample", "truncate")


def sampling_mode(temperatures, top_ps, top_ks) -> str:
    """The cheapest static mode that serves every row of a batch (host-side settings per row):
    "greedy" when every row is greedy (no random draw at all), "truncate" when some sampled row asks for
    top-p or top-k (a vocabulary sort per row), else "sample"."""
    sampled = [(p, k) for t, p, k in zip(temperatures, top_ps, top_ks, strict=True) if t > 0]
    if not sampled:
        return "greedy"
    return "truncate" if any(p < 1 or k > 0 for p, k in sampled) else "sample"


def sample_next_token(
    logits_bv: jax.Array,
    key_b2: jax.Array,
    temperature_b: jax.Array,
    top_p_b: jax.Array,
    top_k_b: jax.Array,
    *,
    mode: str,
) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row. Returns (token_b int32, logprob_b float32).

    The log-probability is under the model's untempered, untruncated distribution (what DPO, CPL and
    PUCT need). `temperature_b == 0` means greedy. `mode` (static, see `sampling_mode`) compiles only
    what the batch needs: a Gumbel draw per vocabulary entry is most of a small model's sampling step,
    and top-k/top-p need a full sort of the vocabulary per row.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode {mode!r} is not one of {SAMPLING_MODES}")
    logits_bv = logits_bv.astype(jnp.float32)
    logprobs_bv = jax.nn.log_softmax(logits_bv, axis=-1)
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy_b, jnp.take_along_axis(logprobs_bv, greedy_b[:, None], axis=-1)[:, 0]
    scaled_bv = logits_bv / jnp.maximum(temperature_b, 1e-6)[:, None]

    if mode == "truncate":
        vocab = logits_bv.shape[-1]
        order_bv = jnp.argsort(-scaled_bv, axis=-1)
        sorted_bv = jnp.take_along_axis(scaled_bv, order_bv, axis=-1)
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        mass_before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        rank_v = jnp.arange(vocab)[None, :]
        # top-p keeps the smallest prefix whose mass reaches p (the first token always survives).
        keep_bv = mass_before_bv < top_p_b[:, None]
        keep_bv &= jnp.where(top_k_b[:, None] > 0, rank_v < top_k_b[:, None], True)
        sorted_bv = jnp.where(keep_bv, sorted_bv, -jnp.inf)
        choice_b = jax.vmap(jax.random.categorical)(key_b2, sorted_bv)
        sampled_b = jnp.take_along_axis(order_bv, choice_b[:, None], axis=-1)[:, 0]
    else:
        sampled_b = jax.vmap(jax.random.categorical)(key_b2, scaled_bv)

    token_b = jnp.where(temperature_b <= 0.0, greedy_b, sampled_b.astype(jnp.int32))
    logprob_b = jnp.take_along_axis(logprobs_bv, token_b[:, None], axis=-1)[:, 0]
    return token_b, logprob_b
