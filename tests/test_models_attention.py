"""The cache-free attention computed in query blocks (`decoder.attend`) equals full attention, and a
right-padded row gets the same bits however long its batch is padded."""

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
        return decoder.attend_cached(q, kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)

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
