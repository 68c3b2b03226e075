"""Per-row KV cache with absolute positions per slot (a ring buffer under a sliding window).

Token at absolute position p lives in slot p % cache_len. `slot_pos_bt` records which position each
slot holds (-1: empty), so attention masks come from positions alone: rows of one batch can be at
different lengths, and a row can be forked (gather/scatter rows) or rewound (truncate) cheaply.

The decoder writes a chunk's keys first and then attends over the cache ("write-then-attend").
Under a sliding window W a ring of T slots stays correct for a chunk of c tokens when the chunk's
writes never overwrite a key its earliest query still needs: positions q0-W+1 .. q0 must survive
writes of q0 .. q0+c-1, i.e. T >= W + c - 1. The decoder therefore splits longer chunks into
sub-chunks of `max_chunk(window)` tokens.

The slots are stored in chunks (separate buffers of `chunk_slots` slots each, the last one possibly
shorter), so that attention can skip a chunk no row has reached: a decode step then reads the keys
in use rather than the whole cache (`decoder.attend_chunks`). One chunk is the plain layout.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from alphallm_jax.models.config import ModelConfig
from alphallm_jax.models.sharding import ShardingRules, logical_to_spec

# Heads before slots, and keys with head_dim before slots: a decode step's scores reduce over head_dim
# across contiguous slots and its output over slots across contiguous head_dim (decoder.attend_chunks).
KEY_NAMES = ("batch", "kv_heads", "head_dim", "cache_seq")
VALUE_NAMES = ("batch", "kv_heads", "cache_seq", "head_dim")
SLOT_NAMES = ("batch", "cache_seq")


def kv_shape(cfg: ModelConfig, batch: int, cache_len: int) -> tuple[int, int, int, int]:
  """One layer's value buffer: [batch, kv_heads, cache_len, head_dim] (named by VALUE_NAMES); the
  key buffer holds as many elements, [batch, kv_heads, head_dim, cache_len] (`key_shape`)."""
  return (batch, cfg.num_kv_heads, cache_len, cfg.head_dim)


def key_shape(cfg: ModelConfig, batch: int, cache_len: int) -> tuple[int, int, int, int]:
  return (batch, cfg.num_kv_heads, cfg.head_dim, cache_len)


def chunk_lengths(cache_len: int, chunk_slots: int | None) -> tuple[int, ...]:
  """Slots per chunk: `chunk_slots` each, the last one what remains (one chunk: None or >= cache_len)."""
  if chunk_slots is None or chunk_slots >= cache_len:
    return (cache_len,)
  if chunk_slots < 1:
    raise ValueError(f"chunk_slots must be positive, got {chunk_slots}")
  full, rest = divmod(cache_len, chunk_slots)
  return (chunk_slots,) * full + ((rest,) if rest else ())


@functools.lru_cache(maxsize=256)
def _empty_cache_builder(cls, key_shapes, value_shapes, slot_shape, dtype, ring: bool, shardings):
  """A jitted maker of an empty cache of these shapes: one dispatch, not one per buffer (a search makes
  a cache for every batch it samples); with `shardings`, every buffer is born sharded."""
  def build():
    zeros = lambda shapes: tuple(tuple(jnp.zeros(s, dtype) for s in layer) for layer in shapes)  # noqa: E731
    return cls(k=zeros(key_shapes), v=zeros(value_shapes), slot_pos_bt=jnp.full(slot_shape, -1, jnp.int32),
               ring=ring)

  return jax.jit(build, out_shardings=shardings)


@flax.struct.dataclass
class KVCache:
  """k[i][j]: layer i's keys in slot chunk j, [batch, kv_heads, head_dim, chunk_len_j]; v[i][j] its
  values, [batch, kv_heads, chunk_len_j, head_dim] (chunks in slot order); slot_pos_bt int32
  [batch, cache_len]."""

  k: tuple[tuple[jax.Array, ...], ...]
  v: tuple[tuple[jax.Array, ...], ...]
  slot_pos_bt: jax.Array
  ring: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None, *,
             prefill_chunk: int | None = None, chunk_slots: int | None = None,
             mesh: jax.sharding.Mesh | None = None, rules: ShardingRules = ShardingRules()) -> KVCache:
    """An empty cache for positions 0 .. max_len-1 (positions must stay below max_len).

    With a sliding window W < max_len the cache is a ring of W + prefill_chunk - 1 slots
    (prefill_chunk defaults to W); longer chunks are processed in sub-chunks by the decoder.
    `chunk_slots` splits the slots into chunks of that many (None: one chunk; see `chunk_lengths`).
    dtype defaults to the compute dtype; with `mesh`, buffers are created already sharded.
    """
    window = cfg.sliding_window
    cache_len, ring = max_len, False
    if window is not None:
      chunk = window if prefill_chunk is None else prefill_chunk
      if window + chunk - 1 < max_len:
        cache_len, ring = window + chunk - 1, True
    dtype = jnp.dtype(dtype or cfg.dtype)
    lengths = chunk_lengths(cache_len, chunk_slots)

    def layers(shape_fn, make):
      return tuple(tuple(make(shape_fn(cfg, batch, n)) for n in lengths) for _ in range(cfg.num_layers))

    shardings = None
    if mesh is not None:
      def sharding(names):
        return lambda shape: NamedSharding(mesh, logical_to_spec(names, rules, shape=shape, mesh=mesh))

      slot_sharding = NamedSharding(
          mesh, logical_to_spec(SLOT_NAMES, rules, shape=(batch, cache_len), mesh=mesh))
      shardings = cls(k=layers(key_shape, sharding(KEY_NAMES)), v=layers(kv_shape, sharding(VALUE_NAMES)),
                      slot_pos_bt=slot_sharding, ring=ring)
    same = lambda shape: shape  # noqa: E731
    return _empty_cache_builder(cls, layers(key_shape, same), layers(kv_shape, same), (batch, cache_len),
                                dtype, ring, shardings)()

  @property
  def batch(self) -> int:
    return self.slot_pos_bt.shape[0]

  @property
  def cache_len(self) -> int:
    return self.slot_pos_bt.shape[1]

  @property
  def chunk_lengths(self) -> tuple[int, ...]:
    """Slots per chunk, in slot order."""
    return tuple(chunk.shape[2] for chunk in self.v[0])

  def max_chunk(self, window: int | None) -> int | None:
    """Longest chunk that one write-then-attend pass handles correctly (None: any)."""
    if not self.ring or window is None:
      return None
    return self.cache_len - window + 1

  def lengths(self) -> jax.Array:
    """Per-row next position: max stored position + 1 (0 for an empty row)."""
    return jnp.max(self.slot_pos_bt, axis=1) + 1

  def gather_rows(self, idx_b: jax.Array) -> KVCache:
    """A cache made of rows `idx_b` of this one (device-side copy; rows may repeat)."""
    return jax.tree.map(lambda x: x[idx_b], self)

  def scatter_rows(self, idx_b: jax.Array, other: KVCache) -> KVCache:
    """This cache with rows `idx_b` replaced by `other`'s rows (in place under donation); an index
    out of range (e.g. `batch`, used as padding) writes nothing."""
    if other.chunk_lengths != self.chunk_lengths:
      raise ValueError(f"cache chunks {other.chunk_lengths} != {self.chunk_lengths}")
    return jax.tree.map(lambda x, o: x.at[idx_b].set(o, mode="drop"), self, other)

  def truncate(self, lengths_b: jax.Array, *, tail_in_one_chunk: bool = False) -> KVCache:
    """Forgets positions >= lengths_b[row] (rewinds rows; the keys become unreachable). Not for a ring
    (sliding-window) cache: the later positions may have overwritten slots of earlier ones still inside
    the window, which a rewind cannot bring back; unless the caller vouches (`tail_in_one_chunk`) that
    they were written within one chunk (`max_chunk`), whose writes overwrite no key still in the window."""
    if self.ring and not tail_in_one_chunk:
      raise ValueError("a ring (sliding-window) KV cache cannot be rewound: later positions may have "
                       "overwritten earlier ones; rebuild the rows from their tokens instead")
    keep = self.slot_pos_bt < jnp.asarray(lengths_b, jnp.int32)[:, None]
    return self.replace(slot_pos_bt=jnp.where(keep, self.slot_pos_bt, -1))
