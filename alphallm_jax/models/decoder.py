"""One NNX decoder for Llama 1/2/3/3.1, Mistral v0.1 and small Llama-architecture models.

Flat style: parameters are named by role and shape (`q_dnh` is [hidden, heads, head_dim]); einsum
strings spell the shapes. Letters: b batch, s query positions, t key positions (or cache slots),
d hidden, n query heads, k KV heads, g query heads per KV head, h head_dim, f MLP width, v vocab.

Parameters stay in `param_dtype` and are cast to the compute `dtype` at use; RMSNorm statistics,
RoPE, attention softmax and logits are float32.

Positions drive all masking: position -1 marks padding (never attended to, never cached), keys
are visible when k_pos <= q_pos, and under a sliding window W when q_pos - k_pos < W.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from alphallm_jax.models import kv_cache as kv_cache_lib
from alphallm_jax.models.config import ModelConfig
from alphallm_jax.models.kv_cache import KVCache
from alphallm_jax.models.rope import apply_rope, inv_frequencies, rope_angles
from alphallm_jax.models.sharding import current_mesh, param, shard_activation

# Finite on purpose: a fully masked query (padding) gets uniform garbage instead of NaN, and a NaN
# could leak into valid rows through 0 * NaN in the probability-value product.
_MASK_VALUE = -1e30
# Query blocking of the cache-free causal attention (`attend`).
QUERY_BLOCK = 64
MAX_QUERY_BLOCKS = 16
# Queries of one pass over a KV cache: a longer prefill goes in passes of this many tokens, each writing
# its keys and values and attending to the cache so far, so that its float32 scores ([rows, heads,
# queries, slots]) grow with the prompt's length, not its square (a 32-head layer's for one 8,192-token
# row: 16 GiB in one pass, 4 GiB in passes of 2,048). Prompts up to this length run in one pass.
PREFILL_QUERY_CHUNK = 2048

ACT_BSD = ("batch", "seq", None)
ACT_BSNH = ("batch", "seq", "q_heads", "head_dim")
ACT_BSKH = ("batch", "seq", "kv_heads", "head_dim")
ACT_BSF = ("batch", "seq", "mlp")
ACT_BSV = ("batch", "seq", "vocab")


def rms_norm(x_bsd: jax.Array, weight_d: nnx.Param, eps: float) -> jax.Array:
  """HF order: normalise in float32, cast back, then scale."""
  x32 = x_bsd.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return x32.astype(x_bsd.dtype) * weight_d[...].astype(x_bsd.dtype)


def attention_mask(q_pos_bs: jax.Array, k_pos_bt: jax.Array, window: int | None) -> jax.Array:
  """bool [batch, s, t]: key is valid, not in the future, and inside the sliding window."""
  q, k = q_pos_bs[:, :, None], k_pos_bt[:, None, :]
  mask = (k >= 0) & (k <= q)
  if window is not None:
    mask &= q - k < window
  return mask


def query_block_size(seq_len: int) -> int:
  """Queries per block of `attend`: `QUERY_BLOCK`, or a larger multiple of it once a sequence would
  need more than `MAX_QUERY_BLOCKS` blocks (each block is its own pair of dots, unrolled in the program)."""
  blocks = -(-seq_len // QUERY_BLOCK)
  return QUERY_BLOCK * max(1, -(-blocks // MAX_QUERY_BLOCKS))


def attend(q_bsnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
           mask_bst: jax.Array) -> jax.Array:
  """Grouped-query causal attention within a chunk (no cache); MHA is the g == 1 case.

  Queries go in blocks (`query_block_size`) and each block attends only to the keys up to its own
  end: the blocks above the causal diagonal, whose keys no query of the block can see, are never
  computed, and each block's scores stay small enough to live in cache through the softmax. That
  holds because, without a cache, a key after a query in the chunk is never visible to it: every
  caller numbers its real tokens in increasing positions along the sequence, padding (-1) anywhere.
  30M benchmark model, 8 x 256 tokens, one layer's attention forward and backward on 2 CPU cores:
  69-72 ms unblocked, 45-50 ms in blocks of 64 (torch's fused SDPA kernel: 40 ms).

  The chunk is padded (masked) to whole blocks, so a query's block always reads the same number of
  keys whatever the chunk's length: a right-padded row gets the same bits in a batch padded to any
  length (up to `QUERY_BLOCK * MAX_QUERY_BLOCKS` tokens), which the critic's scores, and through them
  a resumed search's trees, rely on (unblocked softmax sums over the whole padded length rounded
  differently per length). A query that sees no key (padding) gets uniform weights: garbage no caller
  reads.

  Keys and values go heads-first (`attend_block`): the slots-first einsums made XLA:CPU transpose the
  [b, k, g, s, t] scores and probabilities instead.
  """
  s = q_bsnh.shape[1]
  block = query_block_size(s)
  padded = -(-s // block) * block
  if padded != s:
    pad_s = ((0, 0), (0, padded - s), (0, 0), (0, 0))
    q_bsnh, k_btkh, v_btkh = jnp.pad(q_bsnh, pad_s), jnp.pad(k_btkh, pad_s), jnp.pad(v_btkh, pad_s)
    mask_bst = jnp.pad(mask_bst, ((0, 0), (0, padded - s), (0, padded - s)))  # padded keys: invisible
  k_bkth, v_bkth = k_btkh.transpose(0, 2, 1, 3), v_btkh.transpose(0, 2, 1, 3)
  out_bsnh = jnp.concatenate(
      [attend_block(q_bsnh[:, i:i + block], k_bkth[:, :, :i + block], v_bkth[:, :, :i + block],
                    mask_bst[:, i:i + block, :i + block]) for i in range(0, padded, block)], axis=1)
  return out_bsnh[:, :s]


def attend_block(q_bsnh: jax.Array, k_bkth: jax.Array, v_bkth: jax.Array,
                 mask_bst: jax.Array) -> jax.Array:
  """One query block of `attend`: keys and values heads-first, [batch, kv_heads, keys, head_dim]."""
  b, s, n, h = q_bsnh.shape
  kv_heads = k_bkth.shape[1]
  q_bkgsh = q_bsnh.reshape(b, s, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  scores_bkgst = jnp.einsum("bkgsh,bkth->bkgst", q_bkgsh, k_bkth,
                            preferred_element_type=jnp.float32) * (h ** -0.5)
  scores_bkgst = jnp.where(mask_bst[:, None, None], scores_bkgst, _MASK_VALUE)
  probs_bkgst = jax.nn.softmax(scores_bkgst, axis=-1)
  out_bkgsh = jnp.einsum("bkgst,bkth->bkgsh", probs_bkgst.astype(v_bkth.dtype), v_bkth)
  return out_bkgsh.transpose(0, 3, 1, 2, 4).reshape(b, s, n, h)


def attend_chunks(q_bsnh: jax.Array, kt_chunks: tuple[jax.Array, ...], v_chunks: tuple[jax.Array, ...],
                  mask_bst: jax.Array) -> jax.Array:
  """Attention over a KV cache stored in slot chunks (`KVCache`: keys [b, k, h, c], values
  [b, k, c, h] per chunk), skipping the chunks that no query of the batch can see.

  Each chunk yields its own softmax statistics (max score, sum of exponentials, unnormalised output)
  and the chunks merge at the end, so a chunk past every row's last position costs a `lax.cond`, not
  a read: a decode step reads the slots in use rather than the whole cache. Chunk 0 always runs (a
  query's first key is in it). A chunk that a row cannot see but another row needs adds exact zeros
  to that row, so a row's output does not depend on the rest of its batch.

  A one-token query (decoding) multiplies and reduces instead of dotting: with keys head_dim-major
  the scores reduce over head_dim across contiguous slots, and the output over slots across
  contiguous head_dim (XLA:CPU's YNNPACK reduce fusion; without it the step is up to 8x slower). The
  demo policy's whole decode step (128 rows, 256 slots in 64-slot chunks, 2 cores) ran 10-30% faster
  with 100-250 slots in use than with slot-major keys. Chunk skipping itself: `alphallm bench decode`.
  """
  b, s, n, h = q_bsnh.shape
  kv_heads = v_chunks[0].shape[1]
  q_bkgsh = q_bsnh.reshape(b, s, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4) * (h ** -0.5)

  def part(q_bkgsh, kt_bkhc, v_bkch, mask_bsc):
    if s == 1:
      q_bkgh = q_bkgsh[:, :, :, 0].astype(jnp.float32)
      scores_bkgc = jnp.sum(q_bkgh[..., None] * kt_bkhc[:, :, None].astype(jnp.float32), axis=3)
      scores_bkgsc = scores_bkgc[:, :, :, None, :]
    else:
      scores_bkgsc = jnp.einsum("bkgsh,bkhc->bkgsc", q_bkgsh, kt_bkhc, preferred_element_type=jnp.float32)
    scores_bkgsc = jnp.where(mask_bsc[:, None, None], scores_bkgsc, _MASK_VALUE)
    max_bkgs = jnp.max(scores_bkgsc, axis=-1)
    exp_bkgsc = jnp.exp(scores_bkgsc - max_bkgs[..., None])
    if s == 1:
      out_bkgh = jnp.sum(exp_bkgsc[:, :, :, 0, :, None] * v_bkch[:, :, None].astype(jnp.float32), axis=3)
      out_bkgsh = out_bkgh[:, :, :, None, :]
    else:
      out_bkgsh = jnp.einsum("bkgsc,bkch->bkgsh", exp_bkgsc.astype(v_bkch.dtype), v_bkch,
                             preferred_element_type=jnp.float32)
    return max_bkgs, jnp.sum(exp_bkgsc, axis=-1), out_bkgsh

  def skipped(q_bkgsh, kt_bkhc, v_bkch, mask_bsc):  # merge weight exp(-1e30 - max) = 0
    stat_bkgs = jnp.zeros(q_bkgsh.shape[:-1], jnp.float32)
    return stat_bkgs + _MASK_VALUE, stat_bkgs, jnp.zeros(q_bkgsh.shape, jnp.float32)

  parts, start = [], 0
  for j, (kt_bkhc, v_bkch) in enumerate(zip(kt_chunks, v_chunks)):
    mask_bsc = mask_bst[:, :, start:start + v_bkch.shape[2]]
    start += v_bkch.shape[2]
    args = (q_bkgsh, kt_bkhc, v_bkch, mask_bsc)
    parts.append(part(*args) if j == 0 else jax.lax.cond(jnp.any(mask_bsc), part, skipped, *args))
  if len(parts) == 1:
    _, sum_bkgs, out_bkgsh = parts[0]
  else:
    max_bkgs = functools.reduce(jnp.maximum, [m for m, _, _ in parts])
    weights = [jnp.exp(m - max_bkgs) for m, _, _ in parts]
    sum_bkgs = sum(w * total for w, (_, total, _) in zip(weights, parts))
    out_bkgsh = sum(w[..., None] * o for w, (_, _, o) in zip(weights, parts))
  out_bkgsh = out_bkgsh / sum_bkgs[..., None]
  return out_bkgsh.astype(v_chunks[0].dtype).transpose(0, 3, 1, 2, 4).reshape(b, s, n, h)


def write_chunks(chunks: tuple[jax.Array, ...], row_bs: jax.Array, slot_bs: jax.Array, x_bskh: jax.Array,
                 *, keys: bool) -> tuple[jax.Array, ...]:
  """Scatter one layer's new keys ([b, k, h, c] chunks) or values ([b, k, c, h]) into the chunks that
  hold their slots (in place in donated buffers); a slot outside a chunk, or == cache_len (padding),
  writes nothing there."""
  out, start = [], 0
  for chunk in chunks:
    size = chunk.shape[3 if keys else 2]
    local_bs = slot_bs - start
    local_bs = jnp.where((local_bs >= 0) & (local_bs < size), local_bs, size)  # size: dropped
    x = x_bskh.astype(chunk.dtype)
    if keys:
      chunk = chunk.at[row_bs, :, :, local_bs].set(x, mode="drop")
    else:
      chunk = chunk.at[row_bs, :, local_bs].set(x, mode="drop")
    out.append(shard_activation(chunk, kv_cache_lib.KEY_NAMES if keys else kv_cache_lib.VALUE_NAMES))
    start += size
  return tuple(out)


def project_heads(y_bsd: jax.Array, w_dnh: jax.Array, *, flat: bool) -> jax.Array:
  """[b, s, d] x [d, heads, h] -> [b, s, heads, h]; `flat`: as one product over the flattened heads
  (e = heads * h), see `merge_heads`."""
  if not flat:
    return jnp.einsum("bsd,dnh->bsnh", y_bsd, w_dnh)
  d, heads, h = w_dnh.shape
  out_bse = jnp.einsum("bsd,de->bse", y_bsd, w_dnh.reshape(d, heads * h))
  return out_bse.reshape(*out_bse.shape[:2], heads, h)


def merge_heads(a_bsnh: jax.Array, w_nhd: jax.Array, *, flat: bool) -> jax.Array:
  """[b, s, n, h] x [n, h, d] -> [b, s, d]; `flat`: as one product over the flattened heads (e = n * h).

  The contraction over (n, h) made XLA:CPU copy the [n, h, d] weight transposed on every call, a
  full extra read and write of it per layer and decode step. Flat, the 30M benchmark model's decode
  step ran 11-13% faster at 1 and 16 rows (2 AVX2 cores; the same tokens) and its whole `bench
  sampler` generations 2-5% faster at 1, 16 and 64 rows (medians of three alternating runs); its
  forward and backward over 8 x 256 tokens ran 3.5% slower with the flat q, k, v products, so the
  cache-free path (training, scoring) keeps the einsums.
  """
  if not flat:
    return jnp.einsum("bsnh,nhd->bsd", a_bsnh, w_nhd)
  n, h, d = w_nhd.shape
  return jnp.einsum("bse,ed->bsd", a_bsnh.reshape(*a_bsnh.shape[:2], n * h), w_nhd.reshape(n * h, d))


@jax.custom_vjp
def swiglu_mlp(y_bsd: jax.Array, gate_df: jax.Array, up_df: jax.Array, down_fd: jax.Array) -> jax.Array:
  """`down(silu(y @ gate) * (y @ up))`, with a hand-written backward pass.

  Autodiff's backward fused the SwiGLU derivative into transposed copies of the [b*s, f] gradients
  for the weight-gradient dots, strided writes that cost XLA:CPU more than the dots around them; this
  one computes the same products with the gradients as they lie (30M benchmark model, 8 x 256 tokens,
  forward and backward: 2.72-2.82 -> 2.42-2.45 s). Residuals: the input and the two projections.
  """
  return _swiglu_fwd(y_bsd, gate_df, up_df, down_fd)[0]


def _swiglu_fwd(y_bsd, gate_df, up_df, down_fd):
  gate_bsf = jnp.einsum("bsd,df->bsf", y_bsd, gate_df)
  up_bsf = jnp.einsum("bsd,df->bsf", y_bsd, up_df)
  act_bsf = shard_activation(jax.nn.silu(gate_bsf) * up_bsf, ACT_BSF)
  out_bsd = jnp.einsum("bsf,fd->bsd", act_bsf, down_fd)
  return out_bsd, (y_bsd, gate_bsf, up_bsf, gate_df, up_df, down_fd)


def _swiglu_bwd(res, dout_bsd):
  y_bsd, gate_bsf, up_bsf, gate_df, up_df, down_fd = res
  sig_bsf = jax.nn.sigmoid(gate_bsf)
  silu_bsf = gate_bsf * sig_bsf
  dact_bsf = jnp.einsum("bsd,fd->bsf", dout_bsd, down_fd)
  # [d, f] then transposed: the dot's transposed operand is then the narrower [b*s, d] gradient.
  ddown_fd = jnp.einsum("bsd,bsf->df", dout_bsd, silu_bsf * up_bsf).T
  dgate_bsf = shard_activation(dact_bsf * up_bsf * sig_bsf * (1 + gate_bsf * (1 - sig_bsf)), ACT_BSF)
  dup_bsf = shard_activation(dact_bsf * silu_bsf, ACT_BSF)
  dgate_df = jnp.einsum("bsd,bsf->df", y_bsd, dgate_bsf)
  dup_df = jnp.einsum("bsd,bsf->df", y_bsd, dup_bsf)
  dy_bsd = jnp.einsum("bsf,df->bsd", dgate_bsf, gate_df) + jnp.einsum("bsf,df->bsd", dup_bsf, up_df)
  return (dy_bsd.astype(y_bsd.dtype), dgate_df.astype(gate_df.dtype), dup_df.astype(up_df.dtype),
          ddown_fd.astype(down_fd.dtype))


swiglu_mlp.defvjp(_swiglu_fwd, _swiglu_bwd)


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then + SwiGLU(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, n, k, h, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.intermediate_size)
    pdt = jnp.dtype(cfg.param_dtype)
    init = nnx.initializers.normal(0.02)
    self.cfg = cfg
    self.attn_norm_d = param(jnp.ones((d,), pdt), ("norm",))
    self.q_dnh = param(init(rngs.params(), (d, n, h), pdt), ("embed", "q_heads", "head_dim"))
    self.k_dkh = param(init(rngs.params(), (d, k, h), pdt), ("embed", "kv_heads", "head_dim"))
    self.v_dkh = param(init(rngs.params(), (d, k, h), pdt), ("embed", "kv_heads", "head_dim"))
    self.o_nhd = param(init(rngs.params(), (n, h, d), pdt), ("q_heads", "head_dim", "embed"))
    self.mlp_norm_d = param(jnp.ones((d,), pdt), ("norm",))
    self.gate_df = param(init(rngs.params(), (d, f), pdt), ("embed", "mlp"))
    self.up_df = param(init(rngs.params(), (d, f), pdt), ("embed", "mlp"))
    self.down_fd = param(init(rngs.params(), (f, d), pdt), ("mlp", "embed"))

  def _w(self, p: nnx.Param) -> jax.Array:
    return p[...].astype(self.cfg.dtype)

  def __call__(self, x_bsd: jax.Array, cos_bsh: jax.Array, sin_bsh: jax.Array,
               mask_bst: jax.Array, layer_kv=None, write_bs=None):
    """Returns (x_bsd, (k_cache, v_cache) or None).

    layer_kv: this layer's cache chunks (keys [b, k, h, t_j], values [b, k, t_j, h]; `KVCache`), or None
      to attend within the chunk.
    write_bs: (row_bs, slot_bs) scatter indices; slot == cache_len drops the write (padding).
    """
    eps = self.cfg.rms_norm_eps
    y_bsd = rms_norm(x_bsd, self.attn_norm_d, eps)
    flat = layer_kv is not None  # the cached path (prefill, decode): see `merge_heads`
    q_bsnh = project_heads(y_bsd, self._w(self.q_dnh), flat=flat)
    k_bskh = project_heads(y_bsd, self._w(self.k_dkh), flat=flat)
    v_bskh = project_heads(y_bsd, self._w(self.v_dkh), flat=flat)
    q_bsnh = shard_activation(apply_rope(q_bsnh, cos_bsh, sin_bsh), ACT_BSNH)
    k_bskh = shard_activation(apply_rope(k_bskh, cos_bsh, sin_bsh), ACT_BSKH)
    v_bskh = shard_activation(v_bskh, ACT_BSKH)

    new_kv = None
    if layer_kv is None:
      attn_bsnh = attend(q_bsnh, k_bskh, v_bskh, mask_bst)
    else:
      # Scatter into the (donated) cache buffers: in place, never a rebuilt cache. The cache keeps
      # kv-heads before slots, the layout the attention products read without a transpose (slots first
      # cost a full copy of the cache per layer per decode step).
      row_bs, slot_bs = write_bs
      k_chunks = write_chunks(layer_kv[0], row_bs, slot_bs, k_bskh, keys=True)
      v_chunks = write_chunks(layer_kv[1], row_bs, slot_bs, v_bskh, keys=False)
      new_kv = (k_chunks, v_chunks)
      dtype = self.cfg.dtype
      attn_bsnh = attend_chunks(q_bsnh, tuple(c.astype(dtype) for c in k_chunks),
                                tuple(c.astype(dtype) for c in v_chunks), mask_bst)
    x_bsd = x_bsd + merge_heads(attn_bsnh, self._w(self.o_nhd), flat=flat)
    x_bsd = shard_activation(x_bsd, ACT_BSD)

    y_bsd = rms_norm(x_bsd, self.mlp_norm_d, eps)
    x_bsd = x_bsd + swiglu_mlp(y_bsd, self._w(self.gate_df), self._w(self.up_df), self._w(self.down_fd))
    return shard_activation(x_bsd, ACT_BSD), new_kv


def rematerialised_layers(layers, x_bsd: jax.Array, cos_bsh: jax.Array, sin_bsh: jax.Array,
                          mask_bst: jax.Array) -> jax.Array:
  """The cache-free `layers` as one `lax.scan` over their stacked states, each step under
  `jax.checkpoint`: the backward pass keeps every layer's input (the scan's carry) and rebuilds one
  layer's intermediates (attention scores, MLP projections) at a time. A Python loop of checkpointed
  layers does not bound that: XLA:CPU schedules the recomputations together (a 16-layer toy's gradient:
  2,100 MiB of temporaries against 2,277 without remat; 310 as this scan). The stacked copy of the
  layers' parameters (and of their gradient) is what it costs."""
  if not layers:
    return x_bsd
  graphdef, first = nnx.split(layers[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), first, *(nnx.split(layer)[1] for layer in layers[1:]))

  @jax.checkpoint
  def step(x_bsd, state):
    return nnx.merge(graphdef, state)(x_bsd, cos_bsh, sin_bsh, mask_bst)[0], None

  x_bsd, _ = jax.lax.scan(step, x_bsd, stacked)
  return x_bsd


class Decoder(nnx.Module):
  """Token ids -> final-normed hidden states -> float32 logits, with an optional KVCache."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, v = cfg.hidden_size, cfg.vocab_size
    pdt = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.embed_vd = param(nnx.initializers.normal(0.02)(rngs.params(), (v, d), pdt),
                          ("vocab", "embed"))
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm_d = param(jnp.ones((d,), pdt), ("norm",))
    if not cfg.tie_word_embeddings:
      self.lm_head_dv = param(nnx.initializers.normal(0.02)(rngs.params(), (d, v), pdt),
                              ("embed", "vocab"))

  def __call__(self, input_ids_bs: jax.Array, *, positions_bs: jax.Array | None = None,
               cache: KVCache | None = None):
    """Logits [b, s, v] float32, or (logits, new_cache) when a cache is given."""
    hidden_bsd, new_cache = self.hidden_states(input_ids_bs, positions_bs=positions_bs,
                                               cache=cache)
    logits_bsv = self.logits_from_hidden(hidden_bsd)
    return logits_bsv if cache is None else (logits_bsv, new_cache)

  def logits_from_hidden(self, hidden_bsd: jax.Array) -> jax.Array:
    dtype = self.cfg.dtype
    if self.cfg.tie_word_embeddings:
      logits_bsv = jnp.einsum("bsd,vd->bsv", hidden_bsd, self.embed_vd[...].astype(dtype),
                              preferred_element_type=jnp.float32)
    else:
      logits_bsv = jnp.einsum("bsd,dv->bsv", hidden_bsd, self.lm_head_dv[...].astype(dtype),
                              preferred_element_type=jnp.float32)
    return shard_activation(logits_bsv, ACT_BSV)

  def hidden_states(self, input_ids_bs: jax.Array, *, positions_bs: jax.Array | None = None,
                    cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Final-normed hidden states [b, s, d] and the updated cache (None without a cache).

    positions_bs defaults to 0..s-1 without a cache and to cache.lengths() + 0..s-1 with one.
    """
    input_ids_bs = jnp.asarray(input_ids_bs, jnp.int32)
    b, s = input_ids_bs.shape
    if positions_bs is None:
      start_b = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths()
      positions_bs = start_b[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    positions_bs = jnp.asarray(positions_bs, jnp.int32)
    if cache is None:
      return self._forward(input_ids_bs, positions_bs, None)
    # A ring cache holds a bounded number of slots: longer chunks go in sub-chunks so no key
    # still inside a query's window is overwritten before that query reads it.
    chunk = min(cache.max_chunk(self.cfg.sliding_window) or s, PREFILL_QUERY_CHUNK)
    hidden = []
    for start in range(0, s, chunk):
      h_bsd, cache = self._forward(input_ids_bs[:, start:start + chunk],
                                   positions_bs[:, start:start + chunk], cache)
      hidden.append(h_bsd)
    return (hidden[0] if len(hidden) == 1 else jnp.concatenate(hidden, axis=1)), cache

  def _forward(self, ids_bs: jax.Array, pos_bs: jax.Array, cache: KVCache | None):
    cfg = self.cfg
    table_vd = self.embed_vd[...]
    if current_mesh() is not None:
      # The table's hidden dim is split over fsdp, which the batch of ids is split over too: gathered as
      # is, XLA cannot reshard the rows to the batch's devices and gathers everything everywhere. Gathered
      # over fsdp first (as FSDP gathers every weight it uses, in the compute dtype), the lookup is
      # vocab-parallel over tensor. Without a mesh only the looked-up rows are cast, not the whole table.
      table_vd = shard_activation(table_vd.astype(cfg.dtype), ("vocab", None))
    x_bsd = jnp.take(table_vd, ids_bs, axis=0).astype(cfg.dtype)
    x_bsd = shard_activation(x_bsd, ACT_BSD)
    cos_bsh, sin_bsh = rope_angles(pos_bs, inv_frequencies(cfg))

    if cache is None:
      mask_bst = attention_mask(pos_bs, pos_bs, cfg.sliding_window)
      if cfg.remat:
        x_bsd = rematerialised_layers(self.layers, x_bsd, cos_bsh, sin_bsh, mask_bst)
      else:
        for layer in self.layers:
          x_bsd, _ = layer(x_bsd, cos_bsh, sin_bsh, mask_bst)
      return rms_norm(x_bsd, self.final_norm_d, cfg.rms_norm_eps), None

    b, s = ids_bs.shape
    cache_len = cache.cache_len
    row_bs = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, s))
    slot_bs = jnp.where(pos_bs >= 0, pos_bs % cache_len, cache_len)  # cache_len: dropped
    slot_pos_bt = cache.slot_pos_bt.at[row_bs, slot_bs].set(pos_bs, mode="drop")
    mask_bst = attention_mask(pos_bs, slot_pos_bt, cfg.sliding_window)
    new_k, new_v = [], []
    for layer, k_chunks, v_chunks in zip(self.layers, cache.k, cache.v):
      x_bsd, (k_chunks, v_chunks) = layer(x_bsd, cos_bsh, sin_bsh, mask_bst,
                                          (k_chunks, v_chunks), (row_bs, slot_bs))
      new_k.append(k_chunks)
      new_v.append(v_chunks)
    new_cache = cache.replace(k=tuple(new_k), v=tuple(new_v), slot_pos_bt=slot_pos_bt)
    return rms_norm(x_bsd, self.final_norm_d, cfg.rms_norm_eps), new_cache
