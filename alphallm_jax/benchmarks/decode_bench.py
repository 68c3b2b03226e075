"""`alphallm bench decode`: one decode step over a KV cache stored as one chunk against the same cache
in slot chunks (`KVCache`, `decoder.attend_chunks`), at several cache fills, timed side by side.

Each step feeds one token per row after `fill` cached positions (every row at the same fill) through
the jitted, cache-donating forward the sampler's decode loop runs; the two layouts alternate, so a
shared machine's drift reaches both alike. The default model is the demo's policy shape, whose decode
step on CPU is mostly attention over the cache."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from alphallm_jax.benchmarks.common import machine_info
from alphallm_jax.models import KVCache, create_model, presets
from alphallm_jax.models.kv_cache import chunk_lengths
from alphallm_jax.train.xla_flags import FLAG_SETS, apply_xla_flags


def _filled_caches(cfg, rows: int, cache_len: int, fill: int, chunk_slots: int | None) -> dict[str, KVCache]:
    """One cache whose rows hold positions 0 .. fill-1 (random keys and values), as one chunk and as
    `chunk_slots`-slot chunks with the same contents."""
    one = KVCache.create(cfg, rows, cache_len)
    leaves, treedef = jax.tree.flatten((one.k, one.v))
    keys = jax.random.split(jax.random.PRNGKey(fill), len(leaves))
    k, v = jax.tree.unflatten(treedef, [jax.random.normal(key, x.shape, x.dtype) for key, x in zip(keys, leaves)])
    slots_t = jnp.arange(cache_len, dtype=jnp.int32)
    slot_pos_bt = jnp.broadcast_to(jnp.where(slots_t < fill, slots_t, -1), (rows, cache_len))
    one = one.replace(k=k, v=v, slot_pos_bt=slot_pos_bt)
    bounds = np.cumsum([0, *chunk_lengths(cache_len, chunk_slots)])

    def split(x, axis):  # keys [b, k, h, t] split on axis 3, values [b, k, t, h] on axis 2
        return tuple(jax.lax.slice_in_dim(x, lo, hi, axis=axis) for lo, hi in zip(bounds[:-1], bounds[1:]))

    chunked = one.replace(k=tuple(split(layer[0], 3) for layer in k), v=tuple(split(layer[0], 2) for layer in v),
                          slot_pos_bt=jnp.copy(slot_pos_bt))  # its own buffer: each step donates its cache
    return {"one_chunk": one, "chunked": chunked}


def run(*, preset: str = "demo_policy", rows: int = 128, cache_len: int = 256, fills=(32, 96, 160, 250),
        chunk_slots: int = 64, repeats: int = 15, steps_per_repeat: int = 5, seed: int = 0,
        xla_cpu_flags: str = "recommended") -> dict:
    """Median seconds per decode step with one cache chunk and with `chunk_slots`-slot chunks, per fill."""
    flags_added = apply_xla_flags(FLAG_SETS[xla_cpu_flags])
    cfg = presets.get(preset)
    if max(fills) >= cache_len:
        raise ValueError(f"every fill must be below cache_len {cache_len}: {fills}")
    graphdef, params = nnx.split(create_model(cfg, seed=seed))

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(params, cache, tokens_b1, positions_b1):
        model = nnx.merge(graphdef, params)
        hidden_b1d, cache = model.hidden_states(tokens_b1, positions_bs=positions_b1, cache=cache)
        return model.logits_from_hidden(hidden_b1d), cache

    layouts = ("one_chunk", "chunked")
    tokens_b1 = jnp.ones((rows, 1), jnp.int32)
    out_rows = []
    for fill in tqdm(fills, desc="bench decode"):
        positions_b1 = jnp.full((rows, 1), fill, jnp.int32)  # rewritten each step: the fill stays put
        caches = _filled_caches(cfg, rows, cache_len, fill, chunk_slots)
        times = {name: [] for name in layouts}
        logits = {}
        for repeat in range(repeats + 1):  # the first round compiles and warms up, untimed
            for name in layouts:
                start = time.perf_counter()
                for _ in range(steps_per_repeat):
                    logits[name], caches[name] = step(params, caches[name], tokens_b1, positions_b1)
                jax.block_until_ready(logits[name])
                if repeat:
                    times[name].append((time.perf_counter() - start) / steps_per_repeat)
        one, chunked = (float(np.median(times[name])) for name in layouts)
        out_rows.append({
            "fill": fill, "one_chunk_step_seconds": one, "chunked_step_seconds": chunked,
            "speedup": one / float(chunked),
            "per_pair_speedup_median": float(np.median(np.array(times["one_chunk"]) / np.array(times["chunked"]))),
            "max_abs_logit_difference": float(jnp.max(jnp.abs(logits["one_chunk"] - logits["chunked"]))),
        })
    return {
        "benchmark": "decode",
        "model": {"preset": preset, "param_count": cfg.param_count(), "dtype": cfg.dtype},
        "rows": rows, "cache_len": cache_len, "chunk_slots": chunk_slots,
        "steps_per_repeat": steps_per_repeat, "repeats": repeats,
        "fills": out_rows,
        "xla_cpu_flag_set": xla_cpu_flags,
        "machine": {**machine_info(), "xla_flags_added": flags_added},
    }

