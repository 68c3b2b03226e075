"""The device side of sampling: a jitted prefill and a jitted `lax.while_loop` decode.

Both are pure functions of (graphdef, params, state) so they compile once per shape bucket. The decode
state, KV cache included, is donated and updated in place: each step scatters one key/value per row
into the cache and never rebuilds it. The loop exits as soon as every row has stopped.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from alphallm_jax.models.kv_cache import KVCache
from alphallm_jax.sampling.token_sampling import row_keys, sample_next_token

RUNNING, STOP, EOS, LENGTH = 0, 1, 2, 3
FINISH_REASONS = {STOP: "stop", EOS: "eos", LENGTH: "length"}


@flax.struct.dataclass
class DecodeState:
    cache: KVCache
    tokens_bt: jax.Array  # int32 [B, T] sampled tokens
    logprobs_bt: jax.Array  # float32 [B, T] untempered log-probabilities
    last_token_b: jax.Array  # int32: the newest token, sampled but not yet written to the cache
    pos_b: jax.Array  # int32: the position last_token_b will take
    num_gen_b: jax.Array  # int32
    reason_b: jax.Array  # int32: RUNNING, STOP, EOS or LENGTH
    stop_state_bk: jax.Array  # int32 [B, K] automaton state per stop string
    # Per-row settings, constant through the loop.
    seed_b: jax.Array
    temperature_b: jax.Array
    top_p_b: jax.Array
    top_k_b: jax.Array
    max_new_b: jax.Array
    stop_mask_bk: jax.Array  # bool: which stop strings apply to the row

    @property
    def done_b(self) -> jax.Array:
        return self.reason_b != RUNNING


# A prefill of more tokens than this runs as a loop over blocks of rows (`prefill_row_blocks`): on CPU a
# [rows * seq, d] activation that outgrows the caches runs each matmul well below the machine's peak
# (the 30M-parameter benchmark model: 64 x 128 tokens at once 202 GFLOP/s, 16 x 128 at a time 292).
PREFILL_BLOCK_TOKENS = 2048


def prefill_row_blocks(rows: int, seq: int, data_shards: int = 1) -> int:
    """How many blocks of rows a prefill of `rows` x `seq` tokens runs as: the fewest that keep a block
    within PREFILL_BLOCK_TOKENS, among divisors of `rows` whose blocks still split evenly over the
    mesh's `data_shards` (1: no blocking)."""
    best = 1
    for n in range(1, rows + 1):
        if rows % n or (rows // n) % data_shards:
            continue
        best = n
        if (rows // n) * seq <= PREFILL_BLOCK_TOKENS:
            break
    return best


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=(2,))
def prefill(graphdef, params, cache: KVCache, chunk_bs: jax.Array, positions_bs: jax.Array,
            row_blocks: int = 1):
    """Write a right-padded chunk (position -1 = padding) into the cache.

    Returns the logits at each row's last real token (`float32 [B, V]`) and the cache. Only the last
    hidden state per row goes through the vocabulary projection. `row_blocks` > 1 (static) runs the
    rows as that many blocks in a loop (`prefill_row_blocks`); rows are independent, so the result is
    the same up to the matmuls' rounding. A block takes every `row_blocks`-th row, so that under a mesh
    each block's rows still spread over every data shard.
    """
    model = nnx.merge(graphdef, params)

    def one(cache, chunk_bs, positions_bs):
        hidden_bsd, cache = model.hidden_states(chunk_bs, positions_bs=positions_bs, cache=cache)
        last_b = jnp.argmax(positions_bs, axis=1)
        hidden_bd = jnp.take_along_axis(hidden_bsd, last_b[:, None, None], axis=1)[:, 0]
        logits_bv = model.logits_from_hidden(hidden_bd[:, None, :])[:, 0]
        return logits_bv.astype(jnp.float32), cache

    if row_blocks == 1:
        return one(cache, chunk_bs, positions_bs)
    rows = chunk_bs.shape[0]

    def to_blocks(x):  # [B, ...] -> [n, B / n, ...], block j = rows j, j + n, j + 2n, ...
        return jnp.swapaxes(x.reshape((rows // row_blocks, row_blocks) + x.shape[1:]), 0, 1)

    def from_blocks(x):
        return jnp.swapaxes(x, 0, 1).reshape((rows,) + x.shape[2:])

    logits_nrv, cache_blocks = jax.lax.map(lambda xs: one(*xs), jax.tree.map(
        to_blocks, (cache, chunk_bs, positions_bs)))
    return from_blocks(logits_nrv), jax.tree.map(from_blocks, cache_blocks)


def _sample_step(st: DecodeState, logits_bv, table_kqv, match_state_k, eos_ids, mode,
                 vocab_limit) -> DecodeState:
    """Sample the next token of every running row and apply EOS, stop-string and length rules.
    `vocab_limit` (static): ids from it on are never sampled (`sample_next_token`)."""
    active_b = ~st.done_b
    batch, max_new = st.tokens_bt.shape
    token_b, logprob_b = sample_next_token(
        logits_bv, row_keys(st.seed_b, st.num_gen_b), st.temperature_b, st.top_p_b, st.top_k_b,
        mode=mode, vocab_limit=vocab_limit,
    )
    rows_b = jnp.arange(batch)
    write_at_b = jnp.where(active_b, st.num_gen_b, max_new)  # out of range: dropped
    tokens_bt = st.tokens_bt.at[rows_b, write_at_b].set(token_b, mode="drop")
    logprobs_bt = st.logprobs_bt.at[rows_b, write_at_b].set(logprob_b, mode="drop")

    num_stops = table_kqv.shape[0]
    stop_state_bk = table_kqv[jnp.arange(num_stops)[None, :], st.stop_state_bk, token_b[:, None]]
    stop_state_bk = jnp.where(active_b[:, None], stop_state_bk, st.stop_state_bk)
    hit_stop_b = jnp.any((stop_state_bk == match_state_k[None, :]) & st.stop_mask_bk, axis=1)
    hit_eos_b = jnp.any(token_b[:, None] == eos_ids[None, :], axis=1)
    num_gen_b = st.num_gen_b + active_b.astype(jnp.int32)
    reason_b = jnp.select(
        [hit_eos_b, hit_stop_b, num_gen_b >= st.max_new_b], [EOS, STOP, LENGTH], RUNNING
    ).astype(jnp.int32)
    return st.replace(
        tokens_bt=tokens_bt,
        logprobs_bt=logprobs_bt,
        last_token_b=jnp.where(active_b, token_b, st.last_token_b),
        num_gen_b=num_gen_b,
        reason_b=jnp.where(active_b, reason_b, st.reason_b),
        stop_state_bk=stop_state_bk,
    )


# A batch of 32 or more rows exits at a quarter still running; smaller ones would compact into the
# 8-row minimum (utils.shapes.MIN_ROWS), not enough saving for their own programs.
SHRINK_FRACTION, SHRINK_MIN_BATCH = 4, 32


def shrink_below(batch: int, min_rows: int = 1) -> int:
    """A loop over `batch` rows exits early once at most this many still run (0: never), so that the
    host can continue them in a smaller batch instead of paying for the finished rows every step.
    Never when the smaller batch (at least `min_rows`, the caller's smallest row bucket) would not be
    at most half of this one: a loop that exits into a batch of its own size makes no progress."""
    return batch // SHRINK_FRACTION if batch >= max(SHRINK_MIN_BATCH, 2 * min_rows) else 0


def _decode_loop(graphdef, params, st: DecodeState, table_kqv, match_state_k, eos_ids, mode,
                 min_rows, vocab_limit) -> DecodeState:
    model = nnx.merge(graphdef, params)
    limit = shrink_below(st.tokens_bt.shape[0], min_rows)

    def cond(st: DecodeState):
        running = jnp.sum(~st.done_b)
        return (running > 0) & (running > limit)

    def body(st: DecodeState):
        active_b = ~st.done_b
        positions_b1 = jnp.where(active_b, st.pos_b, -1)[:, None]
        hidden_b1d, cache = model.hidden_states(st.last_token_b[:, None], positions_bs=positions_b1, cache=st.cache)
        logits_bv = model.logits_from_hidden(hidden_b1d)[:, 0]
        st = st.replace(cache=cache, pos_b=st.pos_b + active_b.astype(jnp.int32))
        return _sample_step(st, logits_bv, table_kqv, match_state_k, eos_ids, mode, vocab_limit)

    return jax.lax.while_loop(cond, body, st)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9), donate_argnums=(2,))
def decode(graphdef, params, st: DecodeState, first_logits_bv, table_kqv, match_state_k, eos_ids, mode,
           min_rows: int = 1, vocab_limit: int | None = None):
    """Sample the first token from the prefill logits, then decode until every row has stopped, or
    until only a few rows still run in a large batch (see `shrink_below`; continue with
    `compact_rows`, `resume_decode` and `merge_rows`). `vocab_limit` (static; None: every id): ids from
    it on are never sampled (a model's embedding padded past its tokenizer's vocabulary)."""
    st = _sample_step(st, first_logits_bv, table_kqv, match_state_k, eos_ids, mode, vocab_limit)
    return _decode_loop(graphdef, params, st, table_kqv, match_state_k, eos_ids, mode, min_rows, vocab_limit)


@functools.partial(jax.jit, static_argnums=(0, 6, 7, 8), donate_argnums=(2,))
def resume_decode(graphdef, params, st: DecodeState, table_kqv, match_state_k, eos_ids, mode,
                  min_rows: int = 1, vocab_limit: int | None = None):
    """Continue a decode state whose rows have their next token sampled but not yet cached."""
    return _decode_loop(graphdef, params, st, table_kqv, match_state_k, eos_ids, mode, min_rows, vocab_limit)


@jax.jit
def compact_rows(st: DecodeState, rows_b: jax.Array, real_b: jax.Array) -> DecodeState:
    """The rows `rows_b` of a decode state (cache rows included) as a new, smaller state; rows where
    `real_b` is False are padding and start done."""
    sub = jax.tree.map(lambda x: x[rows_b], st)
    return sub.replace(reason_b=jnp.where(real_b, sub.reason_b, LENGTH))


@functools.partial(jax.jit, donate_argnums=(0,))
def merge_rows(st: DecodeState, rows_b: jax.Array, sub: DecodeState) -> DecodeState:
    """`st` with rows `rows_b` replaced by `sub`'s rows; an index out of range (padding) writes nothing."""
    return jax.tree.map(lambda x, y: x.at[rows_b].set(y, mode="drop"), st, sub)


@jax.jit
def fork_rows(cache: KVCache, logits_uv: jax.Array, source_b: jax.Array):
    """Copy row `source_b[i]` of a prefilled batch into row i: a node's KV state forked into children."""
    return cache.gather_rows(source_b), logits_uv[source_b]
