"""A bounded pool of cached sequence states on the device, with least-recently-used eviction.

A `SeqState` is a host-side handle for a token sequence: its tokens, its parent, and (while cached)
the pool slot that holds its keys and values. The invariant: a cached state's slot holds every token
but the last; the last token is pending (it is fed when the state is continued, which yields the
logits for the next token). Continuing a state prefills only what its slot lacks; an evicted state is
rebuilt from its nearest cached ancestor by prefilling the difference, and cached again.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp

from alphallm_jax.models.kv_cache import KVCache
from alphallm_jax.utils.shapes import row_bucket

_state_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class SeqState:
    """A sequence that sampling can continue. Create roots with `Sampler.new_state`."""

    tokens: tuple[int, ...]
    parent: SeqState | None = None
    id: int = dataclasses.field(default_factory=lambda: next(_state_ids))
    slot: int | None = dataclasses.field(default=None, repr=False)
    was_cached: bool = dataclasses.field(default=False, repr=False)

    def __len__(self) -> int:
        return len(self.tokens)


@functools.partial(jax.jit, donate_argnums=(0,))
def _store_rows(pool: KVCache, slots_b: jax.Array, batch: KVCache, rows_b: jax.Array) -> KVCache:
    return pool.scatter_rows(slots_b, batch.gather_rows(rows_b))


@functools.partial(jax.jit, donate_argnums=(0,))
def _store_rewound_rows(pool: KVCache, slots_b: jax.Array, batch: KVCache, rows_b: jax.Array,
                        lengths_b: jax.Array) -> KVCache:
    rows = batch.gather_rows(rows_b)
    # The caller rewinds a ring row only past writes that fit one chunk, which overwrote no key still
    # inside the window.
    rewound = rows.truncate(lengths_b, tail_in_one_chunk=True)
    return pool.scatter_rows(slots_b, rewound)


@jax.jit
def _gather_rows(pool: KVCache, slots_b: jax.Array) -> KVCache:
    return pool.gather_rows(slots_b)


class KVPool:
    """`num_slots` cached states of up to `max_len` tokens each; slot 0 stays empty (fresh rows)."""

    EMPTY_SLOT = 0

    def __init__(self, model_cfg, num_slots: int, max_len: int, *, cache_factory):
        if num_slots < 2:
            raise ValueError(f"the KV pool needs at least 2 slots, got {num_slots}")
        self.num_slots = num_slots
        self.max_len = max_len
        self.cache: KVCache = cache_factory(num_slots, max_len)
        self._lru: collections.OrderedDict[int, SeqState] = collections.OrderedDict()  # slot -> state
        self._free = list(range(num_slots - 1, 0, -1))
        self.evictions = 0

    def nearest_cached(self, state: SeqState | None) -> SeqState | None:
        """The state itself if cached, else its nearest cached ancestor, else None."""
        while state is not None and state.slot is None:
            state = state.parent
        return state

    def touch(self, state: SeqState) -> None:
        self._lru.move_to_end(state.slot)

    def gather(self, bases: list[SeqState | None]) -> KVCache:
        """A batch cache whose row i is a copy of bases[i]'s slot (the empty slot for None)."""
        slots = [self.EMPTY_SLOT if b is None else b.slot for b in bases]
        for b in bases:
            if b is not None:
                self.touch(b)
        return _gather_rows(self.cache, jnp.asarray(slots, jnp.int32))

    def store(self, batch: KVCache, rows: list[int], states: list[SeqState], pinned: set[int] = frozenset(),
              *, lengths: list[int] | None = None) -> None:
        """Cache `states[i]` from row `rows[i]` of `batch`, evicting least-recently-used states. A batch of
        more states than the pool can give slots (its free ones and every unpinned cached one) caches the
        first that many; the rest count as evicted at once, so continuing one rebuilds it from its nearest
        cached ancestor, as for any evicted state. Nothing is allocated that is not then recorded.
        `lengths`: row i holds positions from lengths[i] on that are not states[i]'s (a rebuilt state's
        row, prefilled past it); the cached copy forgets them."""
        evictable = len(self._lru) if not pinned else sum(1 for s in self._lru.values() if s.id not in pinned)
        room = len(self._free) + evictable
        keep = min(len(states), room)
        slots = [self._allocate(pinned) for _ in range(keep)]
        for slot, state in zip(slots, states):
            state.slot, state.was_cached = slot, True
            self._lru[slot] = state
        for state in states[keep:]:
            state.was_cached = True
        self.evictions += len(states) - keep
        if not slots:
            return
        rows = list(rows)[:keep]
        # Index lists padded to a row bucket (padding writes to slot num_slots: dropped), so storing
        # batches of different sizes reuses the few compiles the device calls' row buckets already need.
        padded = row_bucket(len(slots), 1)
        pad = padded - len(slots)
        slots_b = jnp.asarray(slots + [self.num_slots] * pad, jnp.int32)
        rows_b = jnp.asarray(rows + [0] * pad, jnp.int32)
        if lengths is None:
            self.cache = _store_rows(self.cache, slots_b, batch, rows_b)
        else:
            lengths_b = jnp.asarray(list(lengths)[:keep] + [0] * pad, jnp.int32)
            self.cache = _store_rewound_rows(self.cache, slots_b, batch, rows_b, lengths_b)

    def _allocate(self, pinned) -> int:
        if self._free:
            return self._free.pop()
        for slot, victim in self._lru.items():  # noqa: B007 (slot is used after the loop)
            if victim.id not in pinned:
                break
        else:  # `store` asks for no more slots than it counted free or evictable
            raise AssertionError("KV pool: no free or unpinned slot")
        del self._lru[slot]
        victim.slot = None
        self.evictions += 1
        return slot

    def release(self, state: SeqState) -> None:
        """Forget a state's cached keys and values (e.g. a pruned subtree)."""
        if state.slot is not None:
            del self._lru[state.slot]
            self._free.append(state.slot)
            state.slot = None

    @property
    def num_cached(self) -> int:
        return len(self._lru)
