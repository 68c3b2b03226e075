"""The per-row token draw (`sampling/token_sampling.py`) on fixed weights, without a model: the inverse-CDF
draw follows the weights, never draws an entry of zero weight, and a row's draw depends on its own key
only; the modes compile only what a batch needs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphallm_jax.sampling.token_sampling import inverse_cdf_sample, row_keys, sample_next_token, sampling_mode


def _keys(n: int, seed: int = 0) -> jax.Array:
    return row_keys(jnp.arange(n, dtype=jnp.int32) + seed, jnp.zeros(n, jnp.int32))


def test_inverse_cdf_draws_follow_the_weights():
    weights = np.array([0.0, 3.0, 0.0, 1.0, 0.009, 5.0, 0.0, 0.991, 0.0], np.float32)  # zeros at both ends
    n = 20_000
    draws = np.asarray(jax.jit(inverse_cdf_sample)(_keys(n), jnp.tile(jnp.asarray(weights), (n, 1))))
    counts = np.bincount(draws, minlength=len(weights)) / n
    expected = weights / weights.sum()
    assert np.all(counts[weights == 0] == 0), counts
    assert 0.5 * np.abs(counts - expected).sum() < 0.015, (counts, expected)
    assert counts[4] > 0  # a 0.09% entry is reached


def test_inverse_cdf_rows_are_independent_of_their_batch():
    rng = np.random.default_rng(0)
    weights = jnp.asarray(rng.exponential(size=(16, 300)).astype(np.float32))
    weights = weights.at[:, ::7].set(0.0)
    keys = _keys(16, seed=5)
    batch = np.asarray(inverse_cdf_sample(keys, weights))
    alone = [int(inverse_cdf_sample(keys[i:i + 1], weights[i:i + 1])[0]) for i in range(16)]
    assert batch.tolist() == alone
    assert all(float(weights[i, b]) > 0 for i, b in enumerate(batch))


def test_draws_never_point_past_the_last_positive_weight():
    # The scaled uniform stays below the row's total, so the entry that passes it is one whose running sum
    # rose, never a trailing zero. Rows whose positive weight is first or last, trailing zeros, a tiny total.
    weights = jnp.asarray([[2.0, 0.0, 0.0], [0.0, 0.0, 1e-30]], jnp.float32)
    draws = np.asarray(inverse_cdf_sample(_keys(2), weights))
    assert draws.tolist() == [0, 2]


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.5, 0.8, 0), (2.0, 1.0, 3), (0.7, 0.9, 3)])
def test_sampled_tokens_follow_the_tempered_truncated_softmax(temperature, top_p, top_k):
    logits = np.array([2.0, 1.5, 0.3, -1.0, 0.9, -3.0, 1.2, 0.0], np.float32)
    probs = np.exp(logits / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs)
    kept = order[(np.cumsum(probs[order]) - probs[order]) < top_p]
    kept = kept[:top_k] if top_k else kept
    expected = np.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    n = 20_000
    mode = sampling_mode([temperature], [top_p], [top_k])
    step = jax.jit(functools.partial(sample_next_token, mode=mode))
    tokens, logprobs = step(jnp.tile(jnp.asarray(logits), (n, 1)), _keys(n), jnp.full(n, temperature),
                            jnp.full(n, top_p), jnp.full(n, top_k, jnp.int32))
    counts = np.bincount(np.asarray(tokens), minlength=len(logits)) / n
    assert np.all(counts[expected == 0] == 0)
    assert 0.5 * np.abs(counts - expected).sum() < 0.015, (counts, expected)
    log_softmax = logits - np.log(np.exp(logits).sum())  # untempered, untruncated
    np.testing.assert_allclose(np.asarray(logprobs), log_softmax[np.asarray(tokens)], atol=1e-5)


def test_nucleus_mask_equals_the_sorted_prefix_rule():
    """Against the definition on sorted weights (distinct weights: ties are where the two may differ)."""
    from alphallm_jax.sampling.token_sampling import nucleus_mask

    rng = np.random.default_rng(1)
    weights = rng.permuted(np.tile(np.exp(-np.linspace(0.0, 12.0, 500)), (24, 1)), axis=1).astype(np.float32)
    top_p = rng.choice([0.0, 0.3, 0.9, 0.999, 1.0], size=24).astype(np.float32)
    top_k = rng.choice([0, 1, 7, 499, 800], size=24).astype(np.int32)
    mask = np.asarray(nucleus_mask(jnp.asarray(weights), jnp.asarray(top_p), jnp.asarray(top_k)))
    for row, p, k, got in zip(weights, top_p, top_k, mask):
        order = np.argsort(-row)
        mass_before = np.cumsum(row[order], dtype=np.float64) - row[order]
        keep = mass_before < p * row.sum(dtype=np.float64) if p < 1 else np.ones(len(row), bool)
        keep[0] = True  # the heaviest entry always survives
        keep &= np.arange(len(row)) < k if k > 0 else True
        want = np.zeros(len(row), bool)
        want[order[keep]] = True
        assert np.array_equal(got, want), (p, k, got.sum(), want.sum())


def test_one_rule_masks_equal_both_rules_with_the_other_switched_off():
    """`use_top_p=False` is top-p 1 on every row, `use_top_k=False` top-k 0; rows that ask for neither
    keep every entry."""
    from alphallm_jax.sampling.token_sampling import nucleus_mask

    rng = np.random.default_rng(2)
    weights = jnp.asarray(rng.exponential(size=(16, 300)).astype(np.float32))
    top_p = jnp.asarray(rng.choice([0.2, 0.8, 1.0], size=16).astype(np.float32))
    top_k = jnp.asarray(rng.choice([0, 1, 9], size=16).astype(np.int32))
    only_p = nucleus_mask(weights, top_p, top_k, use_top_k=False)
    only_k = nucleus_mask(weights, top_p, top_k, use_top_p=False)
    np.testing.assert_array_equal(only_p, nucleus_mask(weights, top_p, jnp.zeros_like(top_k)))
    np.testing.assert_array_equal(only_k, nucleus_mask(weights, jnp.ones_like(top_p), top_k))
    np.testing.assert_array_equal(nucleus_mask(weights, top_p, top_k), only_p & only_k)
    assert bool(nucleus_mask(weights, top_p, top_k, use_top_p=False, use_top_k=False).all())


def _bisection_carry(args, mode: str) -> int:
    """How many per-row arrays the nucleus bisection's loop carries in `mode` (2 per rule: lo, hi)."""
    jaxpr = jax.make_jaxpr(functools.partial(sample_next_token, mode=mode))(*args).jaxpr
    loops = [e for e in jaxpr.eqns if str(e.primitive) in ("while", "scan")]
    assert len(loops) == 1, loops
    body = loops[0].params.get("body_jaxpr") or loops[0].params["jaxpr"]
    return sum(1 for v in body.jaxpr.outvars if v.aval.shape == (args[0].shape[0],) and v.aval.dtype == jnp.int32)


def test_an_untruncated_row_draws_the_same_token_in_every_sampling_mode():
    """A row without top-p/top-k draws the same token whether or not a batch mate's truncation compiled
    the nucleus step into its batch: a row's sample never depends on its batch mates."""
    n = 64
    logits = jax.random.normal(jax.random.PRNGKey(3), (n, 50)) * 2.0
    args = (logits, _keys(n, seed=11), jnp.full(n, 0.8), jnp.ones(n), jnp.zeros(n, jnp.int32))
    sampled, _ = sample_next_token(*args, mode="sample")
    for mode in ("top_p", "top_k", "truncate"):
        truncated, _ = sample_next_token(*args, mode=mode)
        assert np.array_equal(np.asarray(sampled), np.asarray(truncated)), mode


def test_sampling_modes_compile_only_what_a_batch_needs():
    """An all-greedy batch draws no random bits, a batch without top-p/top-k runs no nucleus bisection,
    and no mode sorts the vocabulary."""
    assert sampling_mode([0.0, 0.0], [0.9, 1.0], [0, 5]) == "greedy"  # truncation never changes an argmax
    assert sampling_mode([0.0, 0.7], [0.9, 1.0], [0, 0]) == "sample"
    assert sampling_mode([0.0, 0.7], [1.0, 1.0], [0, 3]) == "top_k"
    assert sampling_mode([0.7, 0.7], [0.9, 1.0], [0, 0]) == "top_p"
    assert sampling_mode([0.7, 0.7], [0.9, 1.0], [0, 3]) == "truncate"  # one row each: both bisections
    with pytest.raises(ValueError, match="sampling mode"):
        sample_next_token(jnp.zeros((1, 4)), row_keys(jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32)),
                          jnp.ones(1), jnp.ones(1), jnp.zeros(1, jnp.int32), mode="beam")
    args = (jnp.zeros((2, 8)), row_keys(jnp.arange(2), jnp.zeros(2, jnp.int32)), jnp.zeros(2), jnp.ones(2),
            jnp.zeros(2, jnp.int32))

    def primitives(jaxpr) -> set[str]:  # of the program and every program nested in it
        found = set()
        for eqn in jaxpr.eqns:
            found.add(str(eqn.primitive))
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        found |= primitives(inner)
        return found

    programs = {mode: primitives(jax.make_jaxpr(functools.partial(sample_next_token, mode=mode))(*args).jaxpr)
                for mode in ("greedy", "sample", "top_p", "top_k", "truncate")}
    loops = {"while", "scan"}  # top-p/top-k's bisection
    assert "random_bits" not in programs["greedy"] and not programs["greedy"] & loops
    assert "random_bits" in programs["sample"] and not programs["sample"] & loops
    assert "random_bits" in programs["truncate"] and programs["truncate"] & loops
    for mode in ("top_p", "top_k"):  # one bisection, whose loop carries one (lo, hi) pair per row, not two
        assert "random_bits" in programs[mode] and programs[mode] & loops
    assert _bisection_carry(args, "top_p") == _bisection_carry(args, "top_k") == 2
    assert _bisection_carry(args, "truncate") == 4
    assert not any("sort" in found for found in programs.values())  # no vocabulary sort in any mode


@pytest.mark.parametrize("mode", ["greedy", "sample", "truncate"])
def test_ids_past_the_vocabulary_limit_are_never_drawn(mode):
    """A model whose embedding is padded past its tokenizer's vocabulary: ids from `vocab_limit` on are
    never drawn, however likely, and the log-probability is over the ids below it."""
    n, vocab, limit = 256, 12, 9
    logits = jax.random.normal(jax.random.PRNGKey(5), (n, vocab)).at[:, limit:].add(8.0)  # padded ids favoured
    args = (logits, _keys(n, seed=2), jnp.full(n, 1.0), jnp.full(n, 0.95), jnp.full(n, 5, jnp.int32))
    tokens, logprobs = sample_next_token(*args, mode=mode, vocab_limit=limit)
    assert int(jnp.max(tokens)) < limit
    expected = jax.nn.log_softmax(logits[:, :limit], axis=-1)[jnp.arange(n), tokens]
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(expected), atol=1e-5)


def test_a_vocabulary_limit_at_the_logits_width_traces_the_same_program():
    """No limit, or one at the logits' width (tokenizer and model agree), adds nothing to the program: the
    decode programs of an unpadded model stay as they were."""
    args = (jnp.zeros((2, 8)), row_keys(jnp.arange(2), jnp.zeros(2, jnp.int32)), jnp.ones(2), jnp.ones(2),
            jnp.zeros(2, jnp.int32))

    def program(**kw) -> str:
        return str(jax.make_jaxpr(functools.partial(sample_next_token, mode="truncate", **kw))(*args))

    assert program() == program(vocab_limit=None) == program(vocab_limit=8) == program(vocab_limit=100)
    assert program(vocab_limit=7) != program()
