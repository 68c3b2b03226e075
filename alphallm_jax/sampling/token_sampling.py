"""Per-row next-token sampling: temperature, top-k, top-p, greedy, and untempered log-probabilities.

Every row carries its own settings and its own PRNG key, so a row's sample depends only on its own
seed and step, never on which other rows share the batch (batched search equals sequential search).
A sampled row draws one uniform and locates it in the running sum of its token weights (inverse CDF),
instead of one Gumbel variate per vocabulary entry: on CPU those random bits were most of the draw.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SAMPLING_MODES = ("greedy", "sample", "top_p", "top_k", "truncate")  # truncate: top-p and top-k


def row_keys(seed_b: jax.Array, step_b: jax.Array) -> jax.Array:
    """One raw PRNG key per row from (row seed, row step): `uint32[B, 2]`."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seed_b, step_b)


def sampling_mode(temperatures, top_ps, top_ks) -> str:
    """The cheapest static mode that serves every row of a batch (host-side settings per row):
    "greedy" when every row is greedy (no random draw at all); when some sampled row asks for top-p
    and some (the same or another) for top-k, "truncate" (both bisections per row); "top_p" or "top_k"
    when only one kind of truncation is asked for (that bisection alone); else "sample"."""
    sampled = [(p, k) for t, p, k in zip(temperatures, top_ps, top_ks, strict=True) if t > 0]
    if not sampled:
        return "greedy"
    any_p, any_k = any(p < 1 for p, _ in sampled), any(k > 0 for _, k in sampled)
    return {(False, False): "sample", (True, False): "top_p", (False, True): "top_k"}.get((any_p, any_k), "truncate")


def inverse_cdf_sample(key_b2: jax.Array, weights_bv: jax.Array) -> jax.Array:
    """One index per row, drawn with probability `weights / sum(weights)` (weights >= 0, some positive
    in every row): a uniform per row scaled to the row's total, located in the running sum. Entries of
    zero weight are never drawn (nor weights below float32's resolution of the running sum, ~6e-8 of it).
    """
    cdf_bv = jnp.cumsum(weights_bv, axis=-1)
    total_b = cdf_bv[:, -1]
    u_b = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(key_b2) * total_b
    # u * total may round up to the total itself; kept below it, u is passed by an entry whose running
    # sum rose to pass it, i.e. one of positive weight (never past the last one, never a zero weight).
    u_b = jnp.minimum(u_b, jnp.nextafter(total_b, 0.0))
    return jnp.sum(cdf_bv <= u_b[:, None], axis=-1).astype(jnp.int32)  # the first entry passing u


def nucleus_mask(weights_bv: jax.Array, top_p_b: jax.Array, top_k_b: jax.Array, *,
                 use_top_p: bool = True, use_top_k: bool = True) -> jax.Array:
    """The entries top-p and top-k keep (`weights_bv` >= 0; `top_k_b` 0: no top-k), without sorting.

    Top-p keeps an entry when the weight of the entries strictly heavier than it is below p of the total
    (the smallest prefix of the sorted weights that reaches p, the heaviest entry always kept); top-k keeps
    an entry when fewer than k are strictly heavier (ties at the k-th weight are all kept). Both are a
    threshold on the weight: the heaviest threshold whose kept mass still reaches p (whose kept count
    still reaches k), found by bisection over float32 bit patterns (monotone for non-negative floats): 32
    rounds of masked sums per row instead of a sort of the vocabulary. `use_top_p` / `use_top_k`
    (static) leave one rule out of the program, as if every row had p = 1 (k = 0).
    """
    if not (use_top_p or use_top_k):
        return jnp.ones(weights_bv.shape, bool)
    bits_bv = jax.lax.bitcast_convert_type(weights_bv, jnp.int32)
    target_mass_b = top_p_b * jnp.sum(weights_bv, axis=-1)
    target_count_b = jnp.maximum(top_k_b, 1)

    def qualifies(mid_b, rule):  # does the threshold mid keep enough mass (p) or entries (k)?
        if rule == "p":
            return jnp.sum(jnp.where(bits_bv >= mid_b[:, None], weights_bv, 0.0), axis=-1) >= target_mass_b
        return jnp.sum(bits_bv >= mid_b[:, None], axis=-1) >= target_count_b

    rules = ("p",) * use_top_p + ("k",) * use_top_k

    def bisect(_, bounds):  # per rule, lo: a threshold known to qualify; hi: known not to, + 1
        out = []
        for rule, (lo_b, hi_b) in zip(rules, bounds):
            mid_b = lo_b + (hi_b - lo_b) // 2
            ok_b = qualifies(mid_b, rule)
            out.append((jnp.where(ok_b, mid_b, lo_b), jnp.where(ok_b, hi_b, mid_b)))
        return tuple(out)

    zeros_b = jnp.zeros(weights_bv.shape[:1], jnp.int32)
    top_b = jnp.max(bits_bv, axis=-1) + 1
    found = jax.lax.fori_loop(0, 32, bisect, tuple((zeros_b, top_b) for _ in rules))
    asks_b = {"p": top_p_b < 1.0, "k": top_k_b > 0}  # a row's threshold counts only for a rule it asks for
    threshold_b = zeros_b
    for rule, (lo_b, _) in zip(rules, found):
        threshold_b = jnp.maximum(threshold_b, jnp.where(asks_b[rule], lo_b, 0))
    return bits_bv >= threshold_b[:, None]


def mask_past_vocab(logits_bv: jax.Array, vocab_limit: int | None) -> jax.Array:
    """Logits of ids >= `vocab_limit` set to -inf (None, or a limit past the logits: unchanged, and no op
    is traced, so a model whose vocabulary equals the tokenizer's keeps its compiled programs)."""
    if vocab_limit is None or vocab_limit >= logits_bv.shape[-1]:
        return logits_bv
    ids_v = jnp.arange(logits_bv.shape[-1])
    return jnp.where(ids_v[None, :] < vocab_limit, logits_bv, -jnp.inf)


def sample_next_token(
    logits_bv: jax.Array,
    key_b2: jax.Array,
    temperature_b: jax.Array,
    top_p_b: jax.Array,
    top_k_b: jax.Array,
    *,
    mode: str,
    vocab_limit: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row. Returns (token_b int32, logprob_b float32).

    The log-probability is under the model's untempered, untruncated distribution (what DPO, CPL and
    PUCT need). `temperature_b == 0` means greedy. `mode` (static, see `sampling_mode`) compiles only
    what the batch needs: top-p and top-k each cost a bisection over the vocabulary per row (`nucleus_mask`).
    `vocab_limit` (static; None: every id) drops the ids from it on (a model's padded embedding rows past
    the tokenizer's vocabulary) before anything else, so they are never drawn and the log-probability is
    under the model's distribution renormalised over the ids below it.
    """
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling mode {mode!r} is not one of {SAMPLING_MODES}")
    logits_bv = mask_past_vocab(logits_bv.astype(jnp.float32), vocab_limit)
    token_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    if mode != "greedy":
        # Weights relative to the row's best token, so the largest is exp(0) = 1 at any temperature.
        scaled_bv = (logits_bv - jnp.max(logits_bv, axis=-1, keepdims=True)) / jnp.maximum(temperature_b, 1e-6)[:, None]
        weights_bv = jnp.exp(scaled_bv)
        if mode in ("top_p", "top_k", "truncate"):
            keep_bv = nucleus_mask(weights_bv, top_p_b, top_k_b, use_top_p=mode != "top_k",
                                   use_top_k=mode != "top_p")
            weights_bv = jnp.where(keep_bv, weights_bv, 0.0)
        sampled_b = inverse_cdf_sample(key_b2, weights_bv)
        token_b = jnp.where(temperature_b <= 0.0, token_b, sampled_b.astype(jnp.int32))
    chosen_b = jnp.take_along_axis(logits_bv, token_b[:, None], axis=-1)[:, 0]
    return token_b, chosen_b - jax.nn.logsumexp(logits_bv, axis=-1)
