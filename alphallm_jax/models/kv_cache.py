"""Per-row KV cache with absolute positions per slot (a ring buffer under a sliding window).

Token at absolute position p lives in slot p % cache_len. `slot_pos_bt` records which position each
slot holds (-1: empty), so attention masks come from positions alone: rows of one batch can be at
different lengths, and a row can be forked (gather/scatter rows) or rewound (truncate) cheaply.

The decoder writes a chunk's keys first and then attends over the cache ("write-then-attend").
Under a sliding window W a ring of T slots stays correct for a chunk of c tokens when the chunk's
writes never overwrite a key its earliest query still needs: positions q0-W+1 .. q0 must survive
writes of q0 .. q0+c-1, i.e. T >= W + c - 1. The decoder therefore splits longer chunks into
sub-chunks of `max_chunk(window)` tokens.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from alphallm_jax.models.config import ModelConfig
from alphallm_jax.models.sharding import ShardingRules, logical_to_spec

# Heads before slots: both attention products read the cache as it lies (decoder.attend_cached).
KV_NAMES = ("batch", "kv_heads", "cache_seq", "head_dim")
SLOT_NAMES = ("batch", "cache_seq")


def kv_shape(cfg: ModelConfig, batch: int, cache_len: int) -> tuple[int, int, int, int]:
  """One layer's key (or value) buffer: [batch, kv_heads, cache_len, head_dim] (named by KV_NAMES)."""
  return (batch, cfg.num_kv_heads, cache_len, cfg.head_dim)


@flax.struct.dataclass
class KVCache:
  """k[i], v[i]: layer i's keys/values [batch, kv_heads, cache_len, head_dim]; slot_pos_bt int32."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  slot_pos_bt: jax.Array
  ring: bool = flax.struct.field(pytree_node=False, default=False)

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None, *,
             prefill_chunk: int | None = None, mesh: jax.sharding.Mesh | None = None,
             rules: ShardingRules = ShardingRules()) -> KVCache:
    """An empty cache for positions 0 .. max_len-1 (positions must stay below max_len).

    With a sliding window W < max_len the cache is a ring of W + prefill_chunk - 1 slots
    (prefill_chunk defaults to W); longer chunks are processed in sub-chunks by the decoder.
    dtype defaults to the compute dtype; with `mesh`, buffers are created already sharded.
    """
    window = cfg.sliding_window
    cache_len, ring = max_len, False
    if window is not None:
      chunk = window if prefill_chunk is None else prefill_chunk
      if window + chunk - 1 < max_len:
        cache_len, ring = window + chunk - 1, True
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = kv_shape(cfg, batch, cache_len)

    def build():
      zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
      slot_pos = jnp.full((batch, cache_len), -1, jnp.int32)
      return cls(k=zeros, v=tuple(jnp.zeros_like(z) for z in zeros), slot_pos_bt=slot_pos,
                 ring=ring)

    if mesh is None:
      return build()
    kv_sharding = NamedSharding(mesh, logical_to_spec(KV_NAMES, rules, shape=shape, mesh=mesh))
    slot_sharding = NamedSharding(
        mesh, logical_to_spec(SLOT_NAMES, rules, shape=(batch, cache_len), mesh=mesh))
    shardings = cls(k=(kv_sharding,) * cfg.num_layers, v=(kv_sharding,) * cfg.num_layers,
                    slot_pos_bt=slot_sharding, ring=ring)
    return jax.jit(build, out_shardings=shardings)()

  @property
  def batch(self) -> int:
    return self.slot_pos_bt.shape[0]

  @property
  def cache_len(self) -> int:
    return self.slot_pos_bt.shape[1]

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
    return self.replace(k=tuple(k[idx_b] for k in self.k), v=tuple(v[idx_b] for v in self.v),
                        slot_pos_bt=self.slot_pos_bt[idx_b])

  def scatter_rows(self, idx_b: jax.Array, other: KVCache) -> KVCache:
    """This cache with rows `idx_b` replaced by `other`'s rows (in place under donation); an index
    out of range (e.g. `batch`, used as padding) writes nothing."""
    if other.cache_len != self.cache_len:
      raise ValueError(f"cache_len {other.cache_len} != {self.cache_len}")
    return self.replace(
        k=tuple(k.at[idx_b].set(o, mode="drop") for k, o in zip(self.k, other.k)),
        v=tuple(v.at[idx_b].set(o, mode="drop") for v, o in zip(self.v, other.v)),
        slot_pos_bt=self.slot_pos_bt.at[idx_b].set(other.slot_pos_bt, mode="drop"))

  def truncate(self, lengths_b: jax.Array) -> KVCache:
    """Forgets positions >= lengths_b[row] (rewinds rows; the keys become unreachable)."""
    keep = self.slot_pos_bt < jnp.asarray(lengths_b, jnp.int32)[:, None]
    return self.replace(slot_pos_bt=jnp.where(keep, self.slot_pos_bt, -1))
