"""The cache-free attention computed in query blocks (`decoder.attend`) equals full attention, and a
right-padded row gets the same bits however long its batch is padded; the cached attention over slot
chunks (`decoder.attend_chunks`) equals full attention whatever the chunking, skips the chunks no row
sees, and gives a row the same bits whatever the rest of its batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alphallm_jax.models import decoder


def _positions(kind: str, b: int, s: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    pos = np.full((b, s), -1, np.int32)
    for i, n in enumerate(rng.integers(s // 3, s + 1, b)):
        if kind == "right":  # training batches: real tokens first
            pos[i, :n] = np.arange(n)
        else:  # scoring batches: padding first
            pos[i, s - n:] = np.arange(n)
    return pos


@pytest.mark.parametrize("kind,window", [("right", None), ("left", None), ("right", 50)])
def test_blocked_attention_equals_full_attention_with_padding_and_windows(kind, window):
    b, s, n, k, h = 3, 200, 4, 2, 16  # 200: blocks of 64, the last one partial
    assert decoder.query_block_size(s) < s
    rng = np.random.default_rng(1)
    q, kk, v, w = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                   for shape in [(b, s, n, h), (b, s, k, h), (b, s, k, h), (b, s, n, h)])
    pos = jnp.asarray(_positions(kind, b, s))
    mask = decoder.attention_mask(pos, pos, window)
    real = (pos >= 0)[:, :, None, None]  # a padding query's output is never read

    def full_attention(q, kk, v, mask):  # every query against every key
        return decoder.attend_block(q, kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)

    def loss(attention, q, kk, v):
        out = attention(q, kk, v, mask)
        return jnp.sum(jnp.where(real, out * w, 0.0)), out

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
    (blocked_loss, blocked), blocked_grads = grad(decoder.attend, q, kk, v)
    (full_loss, full), full_grads = grad(full_attention, q, kk, v)
    np.testing.assert_allclose(np.where(real, blocked, 0), np.where(real, full, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(blocked_loss, full_loss, rtol=1e-5)
    for got, want in zip(blocked_grads, full_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_right_padded_row_gets_the_same_bits_at_every_padded_length():
    n, h = 150, 16
    rng = np.random.default_rng(2)
    q, kk, v = (rng.standard_normal((1, n, heads, h)).astype(np.float32) for heads in (4, 2, 2))

    def row_alone_padded_to(s):
        pad = ((0, 0), (0, s - n), (0, 0), (0, 0))
        pos = np.full((1, s), -1, np.int32)
        pos[0, :n] = np.arange(n)
        mask = decoder.attention_mask(jnp.asarray(pos), jnp.asarray(pos), None)
        out = jax.jit(decoder.attend)(np.pad(q, pad), np.pad(kk, pad), np.pad(v, pad), mask)
        return np.asarray(out)[0, :n]

    want = row_alone_padded_to(n)
    for s in (160, 192, 256, 300):
        np.testing.assert_array_equal(row_alone_padded_to(s), want)


def test_query_blocks_stay_few_on_long_sequences():
    assert decoder.query_block_size(64) == 64 and decoder.query_block_size(256) == 64
    assert decoder.query_block_size(1024) == 64 and decoder.query_block_size(1025) == 128
    assert decoder.query_block_size(4096) == 4096 // decoder.MAX_QUERY_BLOCKS


def _chunked(k_bkth, v_bkth, sizes):
    """Keys [b, k, h, c] and values [b, k, c, h] per chunk of the given sizes, as `KVCache` stores them."""
    bounds = np.cumsum([0, *sizes])
    return (tuple(k_bkth[:, :, a:b].transpose(0, 1, 3, 2) for a, b in zip(bounds[:-1], bounds[1:])),
            tuple(v_bkth[:, :, a:b] for a, b in zip(bounds[:-1], bounds[1:])))


@pytest.mark.parametrize("s", [1, 5])
@pytest.mark.parametrize("sizes", [(96,), (32, 32, 32), (64, 32), (40, 40, 16)])
def test_chunked_cache_attention_equals_full_attention(s, sizes):
    b, t, n, k, h = 4, 96, 4, 2, 16
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((b, s, n, h)), jnp.float32)
    kk, v = (jnp.asarray(rng.standard_normal((b, k, t, h)), jnp.float32) for _ in range(2))
    key_pos = np.full((b, t), -1, np.int32)
    for i, used in enumerate([3, 40, 70, 96]):  # rows at different lengths
        key_pos[i, :used] = np.arange(used)
    q_pos = key_pos.max(axis=1, keepdims=True) - np.arange(s)[::-1][None, :]
    mask = decoder.attention_mask(jnp.asarray(q_pos), jnp.asarray(key_pos), window=30)
    want = decoder.attend_block(q, kk, v, mask)
    got = jax.jit(decoder.attend_chunks)(q, *_chunked(kk, v, sizes), mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_chunked_attention_skips_unseen_chunks_and_a_row_ignores_its_batch():
    b, t, n, k, h = 2, 128, 4, 2, 8
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((b, 1, n, h)), jnp.float32)
    kk, v = (jnp.asarray(rng.standard_normal((b, k, t, h)), jnp.float32) for _ in range(2))
    chunks = _chunked(kk, v, (32,) * 4)

    def run(lengths, k_chunks):
        key_pos = np.where(np.arange(t)[None, :] < np.asarray(lengths)[:, None], np.arange(t)[None, :], -1)
        mask = decoder.attention_mask(jnp.asarray(key_pos.max(axis=1, keepdims=True)), jnp.asarray(key_pos), None)
        return np.asarray(jax.jit(decoder.attend_chunks)(q, k_chunks, chunks[1], mask))

    # Row 0 sees 20 slots; row 1 reaches chunk 3 (then chunks 1-3 run) or chunk 0 only (they are skipped).
    alone, beside_long = run([20, 10], chunks[0]), run([20, 100], chunks[0])
    np.testing.assert_array_equal(alone[0], beside_long[0])
    # A skipped chunk is never read: NaN keys there change nothing.
    poisoned = tuple(c if j == 0 else jnp.full_like(c, jnp.nan) for j, c in enumerate(chunks[0]))
    np.testing.assert_array_equal(run([20, 10], poisoned), alone)
    assert np.isnan(run([20, 100], poisoned)[1]).all()
