"""KVCache: in-place decode under donation, ring-buffer sizing and chunking, row fork/rewind.

All sequences are prefixes of one token matrix, so one jitted full forward is the reference
for every test (a causal model's logits on a prefix are a prefix of its logits).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alphallm_jax.models import KVCache, create_model, get_preset

CFG = get_preset("tiny")
WINDOW_CFG = CFG.replace(sliding_window=8, architecture="mistral")
TOTAL = 29
IDS = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, TOTAL))
TOL = 1e-5


class Harness:
  """A model, its jitted cached step (donated cache) and its full-forward logits on IDS."""

  def __init__(self, cfg, seed):
    self.cfg = cfg
    self.model = create_model(cfg, seed=seed)
    graphdef, self.state = nnx.split(self.model)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(state, cache, ids_bs, positions_bs):
      return nnx.merge(graphdef, state)(ids_bs, positions_bs=positions_bs, cache=cache)

    self.jit_step = step
    self.full = np.asarray(nnx.jit(lambda m, x: m(x))(self.model, jnp.asarray(IDS)))

  def step(self, cache, ids, pos=None):
    ids = jnp.asarray(ids, jnp.int32)
    if pos is None:
      pos = cache.lengths()[:, None] + jnp.arange(ids.shape[1], dtype=jnp.int32)
    return self.jit_step(self.state, cache, ids, jnp.asarray(pos, jnp.int32))


@pytest.fixture(scope="module")
def plain():
  return Harness(CFG, seed=3)


@pytest.fixture(scope="module")
def windowed():
  return Harness(WINDOW_CFG, seed=4)


def test_cache_sizes():
  assert KVCache.create(CFG, 2, 40).cache_len == 40
  ring = KVCache.create(WINDOW_CFG, 2, 40, prefill_chunk=4)
  assert ring.ring and ring.cache_len == 8 + 4 - 1
  assert KVCache.create(WINDOW_CFG, 2, 40).cache_len == 2 * 8 - 1  # default chunk = window
  short = KVCache.create(WINDOW_CFG, 2, 10)
  assert not short.ring and short.cache_len == 10
  empty = KVCache.create(CFG, 3, 16, dtype="bfloat16")
  np.testing.assert_array_equal(empty.lengths(), [0, 0, 0])
  assert empty.k[0][0].shape == (3, CFG.num_kv_heads, CFG.head_dim, 16)  # keys: head_dim before slots
  assert empty.v[0][0].shape == (3, CFG.num_kv_heads, 16, CFG.head_dim)
  assert empty.k[0][0].dtype == jnp.bfloat16 and empty.slot_pos_bt.dtype == jnp.int32
  assert len(empty.k) == len(empty.v) == CFG.num_layers and empty.chunk_lengths == (16,)
  chunked = KVCache.create(CFG, 2, 40, chunk_slots=16)
  assert chunked.chunk_lengths == (16, 16, 8) and chunked.cache_len == 40
  assert [c.shape for c in chunked.k[1]] == [(2, CFG.num_kv_heads, CFG.head_dim, n) for n in (16, 16, 8)]
  assert KVCache.create(CFG, 2, 40, chunk_slots=64).chunk_lengths == (40,)
  with pytest.raises(ValueError, match="chunk_slots"):
    KVCache.create(CFG, 2, 40, chunk_slots=0)


@pytest.mark.parametrize("chunk_slots", [None, 8])
def test_decode_step_updates_cache_in_place(plain, chunk_slots):
  cache = KVCache.create(CFG, 2, 32, chunk_slots=chunk_slots)
  _, cache = plain.step(cache, IDS[:, :7])
  buffers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(cache)]
  ids, pos = jnp.asarray(IDS[:, 7:8]), cache.lengths()[:, None]
  hlo = plain.jit_step.lower(plain.state, cache, ids, pos).compile().as_text()
  old = cache
  logits, cache = plain.step(cache, ids, pos)
  assert old.k[0][0].is_deleted()  # the cache argument was donated ...
  # ... and every output buffer is the input buffer: updated in place, not rebuilt.
  assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(cache)] == buffers
  n = chunk_slots or 32
  assert not re.search(rf"= f32\[2,2,({n},16|16,{n})\]\{{[0-9,]*\}} copy\(", hlo)
  np.testing.assert_array_equal(cache.lengths(), [8, 8])
  np.testing.assert_allclose(logits[:, 0], plain.full[:, 7], atol=TOL)


def test_hidden_states_and_logits_compose(plain):
  hidden, no_cache = plain.model.hidden_states(IDS)
  assert no_cache is None and hidden.shape == (2, TOTAL, CFG.hidden_size)
  np.testing.assert_allclose(plain.model.logits_from_hidden(hidden), plain.full, atol=TOL)


def test_ring_cache_any_chunking_matches_full_forward(windowed):
  """Chunks longer than the ring's capacity (3) are split internally; results never change."""
  chunks = [1, 9, 1, 4, 9, 4, 1]
  assert sum(chunks) == TOTAL
  cache = KVCache.create(WINDOW_CFG, 2, TOTAL, prefill_chunk=3)
  assert cache.ring and cache.cache_len == 10
  start, outs = 0, []
  for c in chunks:
    logits, cache = windowed.step(cache, IDS[:, start:start + c])
    outs.append(np.asarray(logits))
    start += c
  np.testing.assert_allclose(np.concatenate(outs, axis=1), windowed.full, atol=TOL)
  assert int(cache.slot_pos_bt.max()) == TOTAL - 1 and int(cache.slot_pos_bt.min()) >= 0


def test_a_long_prefill_runs_in_query_passes_with_the_same_logits_and_less_memory(monkeypatch):
  # Passes of PREFILL_QUERY_CHUNK queries, each attending to the cache so far: the scores grow with the
  # prompt, not its square (a 32-head layer, one 8,192-token row: XLA's temporaries 16.0 -> 4.0 GiB).
  from alphallm_jax.models import decoder

  cfg = CFG.replace(max_position_embeddings=256, num_heads=16, num_kv_heads=4, head_dim=8, num_layers=1)
  model = create_model(cfg, seed=5)
  ids = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 256)), jnp.int32)
  full = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))

  def prefill(chunk):
    monkeypatch.setattr(decoder, "PREFILL_QUERY_CHUNK", chunk)
    fn = jax.jit(lambda ids, cache: model(ids, cache=cache))  # traced anew: the constant is read at trace time
    cache = KVCache.create(cfg, 2, 256)
    logits, _ = fn(ids, cache)
    return np.asarray(logits), fn.lower(ids, cache).compile().memory_analysis().temp_size_in_bytes

  whole, whole_bytes = prefill(1 << 20)
  parts, parts_bytes = prefill(64)
  np.testing.assert_allclose(whole, full, atol=TOL)
  np.testing.assert_allclose(parts, full, atol=TOL)
  assert parts_bytes < 0.5 * whole_bytes, (parts_bytes, whole_bytes)


def test_fork_rows_continues_like_the_parent(plain):
  parent = KVCache.create(CFG, 2, 32)
  _, parent = plain.step(parent, IDS[:, :7])
  children = parent.gather_rows(jnp.array([1, 0]))  # a device-side copy, rows swapped
  np.testing.assert_array_equal(children.lengths(), [7, 7])
  logits, children = plain.step(children, IDS[::-1, 7:8])
  np.testing.assert_allclose(logits[:, 0], plain.full[::-1, 7], atol=TOL)

  twins = children.gather_rows(jnp.array([0, 0]))  # one node forked into two children
  logits, twins = plain.step(twins, IDS[[1, 1], 8:9])
  np.testing.assert_allclose(logits[:, 0], plain.full[[1, 1], 8], atol=TOL)

  # Store a child back into row 0 of a pool (as the KV pool does) and keep decoding there.
  pool = KVCache.create(CFG, 2, 32).scatter_rows(jnp.array([0]), twins.gather_rows(
      jnp.array([1])))
  np.testing.assert_array_equal(pool.lengths(), [9, 0])
  logits, _ = plain.step(pool, np.array([[IDS[1, 9]], [IDS[0, 0]]]), np.array([[9], [0]]))
  np.testing.assert_allclose(logits[0, 0], plain.full[1, 9], atol=TOL)
  np.testing.assert_allclose(logits[1, 0], plain.full[0, 0], atol=TOL)  # fresh row


def test_truncate_rewinds_rows(plain):
  cache = KVCache.create(CFG, 2, 32)
  wrong = (IDS[:, :12] + 1) % CFG.vocab_size
  _, cache = plain.step(cache, np.concatenate([IDS[:, :8], wrong[:, 8:]], axis=1))
  cache = cache.truncate(jnp.array([8, 8]))
  np.testing.assert_array_equal(cache.lengths(), [8, 8])
  logits, cache = plain.step(cache, IDS[:, 8:12])
  np.testing.assert_allclose(logits, plain.full[:, 8:12], atol=TOL)
  ring = cache.replace(ring=True)  # a sliding-window ring: overwritten slots cannot come back
  with pytest.raises(ValueError, match="ring .* cannot be rewound"):
    ring.truncate(jnp.array([8, 8]))
