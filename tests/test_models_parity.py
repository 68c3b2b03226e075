"""Logit parity with transformers' reference Llama/Mistral on tiny random models (fp32, eager).

Each variant is checked for the full forward, prefill + token-by-token decode through the
KVCache, ragged batches (rows of different lengths via position -1), and export back to HF.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from alphallm_jax.models import KVCache, abstract_model, load_hf_checkpoint, save_hf_checkpoint

TOL = 1e-4
VOCAB = 256
SEQ = 32
PREFILL = 20  # longer than Mistral's window (8) and than the ring's sub-chunk

VARIANTS = {
    "llama2_mha": ("llama", dict()),
    "llama3_gqa_rope_scaling": ("llama", dict(
        num_key_value_heads=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "mistral_sliding_window": ("mistral", dict(num_key_value_heads=2, sliding_window=8)),
    "tied_embeddings_head_dim": ("llama", dict(num_key_value_heads=2, head_dim=32,
                                               tie_word_embeddings=True)),
}


def make_hf_model(kind: str, seed: int = 0, **overrides):
  torch.manual_seed(seed)
  config_cls = transformers.MistralConfig if kind == "mistral" else transformers.LlamaConfig
  config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                      initializer_range=0.08, **overrides)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                        dtype=torch.float32)
  return model.eval()


def hf_logits(hf_model, ids) -> np.ndarray:
  with torch.no_grad():
    return hf_model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
  kind, overrides = VARIANTS[request.param]
  hf_model = make_hf_model(kind, **overrides)
  path = tmp_path_factory.mktemp(request.param)
  hf_model.save_pretrained(path)
  model, cfg = load_hf_checkpoint(path)
  ids = np.random.RandomState(1).randint(0, VOCAB, (2, SEQ))
  return dict(name=request.param, hf=hf_model, model=model, cfg=cfg, path=path, ids=ids,
              ref=hf_logits(hf_model, ids), step=make_step(model))


def make_step(model):
  """A jitted model call over a donated cache, as the sampler runs it."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(state, cache, ids_bs, positions_bs):
    return nnx.merge(graphdef, state)(ids_bs, positions_bs=positions_bs, cache=cache)

  return lambda cache, ids, pos: step(state, cache, jnp.asarray(ids, jnp.int32),
                                      jnp.asarray(pos, jnp.int32))


def test_full_forward_matches_hf(variant):
  logits = variant["model"](variant["ids"])
  assert logits.dtype == jnp.float32 and logits.shape == (2, SEQ, VOCAB)
  assert max_diff(logits, variant["ref"]) <= TOL


def test_scaling_and_window_change_the_logits(variant):
  """Guards the parity test: the feature under test must matter at this sequence length."""
  cfg = variant["cfg"]
  if cfg.rope_scaling is None and cfg.sliding_window is None:
    pytest.skip("no RoPE scaling or sliding window in this variant")
  plain = abstract_model(cfg.replace(rope_scaling=None, sliding_window=None))
  nnx.update(plain, nnx.state(variant["model"]))
  assert max_diff(plain(variant["ids"]), variant["ref"]) > 100 * TOL


@pytest.mark.parametrize("prefill_chunk", [4, None])
def test_prefill_then_decode_matches_hf(variant, prefill_chunk):
  cfg, ref = variant["cfg"], variant["ref"]
  if prefill_chunk is not None and cfg.sliding_window is None:
    pytest.skip("prefill_chunk only sizes sliding-window ring caches")
  cache = KVCache.create(cfg, 2, SEQ, prefill_chunk=prefill_chunk)
  if cfg.sliding_window is not None:
    assert cache.ring and cache.cache_len < SEQ  # bounded rolling cache
  step = variant["step"]
  ids = variant["ids"]
  pos = np.broadcast_to(np.arange(SEQ), (2, SEQ))
  logits, cache = step(cache, ids[:, :PREFILL], pos[:, :PREFILL])
  assert max_diff(logits, ref[:, :PREFILL]) <= TOL
  for t in range(PREFILL, SEQ):
    logits, cache = step(cache, ids[:, t:t + 1], pos[:, t:t + 1])
    assert max_diff(logits[:, 0], ref[:, t]) <= TOL, t
  np.testing.assert_array_equal(cache.lengths(), [SEQ, SEQ])


def test_ragged_batch_without_cache(variant):
  """Row 1 is left-padded: its padding (position -1) must not change its logits."""
  ids = variant["ids"].copy()
  short = 21
  pad = SEQ - short
  ids[1, :pad] = 0
  pos = np.stack([np.arange(SEQ), np.r_[np.full(pad, -1), np.arange(short)]])
  logits = np.asarray(variant["model"](ids, positions_bs=pos))
  assert max_diff(logits[0], variant["ref"][0]) <= TOL
  ref_row1 = hf_logits(variant["hf"], ids[1:, pad:])[0]
  assert max_diff(logits[1, pad:], ref_row1) <= TOL


def test_ragged_batch_with_cache(variant):
  """Rows at different lengths: row 1's prefill is right-padded, then both rows decode."""
  cfg, hf = variant["cfg"], variant["hf"]
  ids = variant["ids"]
  short = 13
  cache = KVCache.create(cfg, 2, SEQ, prefill_chunk=4 if cfg.sliding_window else None)
  step = variant["step"]
  chunk = ids[:, :PREFILL].copy()
  pos = np.stack([np.arange(PREFILL), np.r_[np.arange(short), np.full(PREFILL - short, -1)]])
  chunk[1, short:] = 0
  logits, cache = step(cache, chunk, pos)
  np.testing.assert_array_equal(cache.lengths(), [PREFILL, short])
  steps = SEQ - PREFILL
  ref0 = variant["ref"][0]
  row1_ids = ids[1, :short + steps]
  ref1 = hf_logits(hf, row1_ids[None])[0]
  assert max_diff(logits[0], ref0[:PREFILL]) <= TOL
  assert max_diff(logits[1, :short], ref1[:short]) <= TOL
  for i in range(steps):
    tok = np.array([[ids[0, PREFILL + i]], [row1_ids[short + i]]])
    p = np.array([[PREFILL + i], [short + i]])
    logits, cache = step(cache, tok, p)
    assert max_diff(logits[0, 0], ref0[PREFILL + i]) <= TOL, i
    assert max_diff(logits[1, 0], ref1[short + i]) <= TOL, i


def test_export_roundtrip_loads_in_transformers(variant, tmp_path):
  save_hf_checkpoint(variant["model"], variant["cfg"], tmp_path)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
  ours = variant["model"](variant["ids"])
  assert max_diff(hf_logits(reloaded, variant["ids"]), ours) <= TOL


def test_sharded_safetensors_export_and_import(tmp_path):
  hf_model = make_hf_model("llama", num_key_value_heads=2)
  hf_model.save_pretrained(tmp_path / "src")
  model, cfg = load_hf_checkpoint(tmp_path / "src")
  save_hf_checkpoint(model, cfg, tmp_path / "out", max_shard_bytes=64 * 1024)
  index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  reloaded, cfg2 = load_hf_checkpoint(tmp_path / "out")
  assert cfg2 == cfg
  ids = np.arange(24).reshape(2, 12)
  assert max_diff(reloaded(ids), hf_logits(hf_model, ids)) <= TOL
  hf_again = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "out", attn_implementation="eager", dtype=torch.float32).eval()
  assert max_diff(hf_logits(hf_again, ids), hf_logits(hf_model, ids)) <= TOL


def test_bfloat16_checkpoint_loads_bit_exact(tmp_path):
  hf_model = make_hf_model("mistral", num_key_value_heads=2, sliding_window=8)
  hf_model.to(torch.bfloat16).save_pretrained(tmp_path)
  model, cfg = load_hf_checkpoint(tmp_path, dtype="bfloat16")
  assert cfg.param_dtype == "bfloat16" and model.layers[0].q_dnh[...].dtype == jnp.bfloat16
  hf_q = hf_model.model.layers[0].self_attn.q_proj.weight.detach()   # [n*h, d]
  ours_q = np.asarray(model.layers[0].q_dnh[...]).reshape(64, -1).T  # -> [n*h, d]
  np.testing.assert_array_equal(ours_q.view(np.uint16), hf_q.view(torch.int16).numpy().view(np.uint16))
  ids = np.arange(16).reshape(1, 16)
  ref = hf_logits(hf_model.float(), ids)
  # bf16 weights and activations: agreement at bf16 precision only.
  assert max_diff(model(ids), ref) < 0.1


def test_swiglu_mlp_hand_written_backward_equals_autodiff():
    """The MLP's custom VJP gives autodiff's gradients of the plain formula, for every input."""
    from alphallm_jax.models.decoder import swiglu_mlp

    def plain(y, gate, up, down):
        return jnp.einsum("bsf,fd->bsd", jax.nn.silu(jnp.einsum("bsd,df->bsf", y, gate))
                          * jnp.einsum("bsd,df->bsf", y, up), down)

    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(2, 5, 8), (8, 12), (8, 12), (12, 8)]]
    weight = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    ours = jax.grad(lambda *a: jnp.sum(swiglu_mlp(*a) * weight), argnums=(0, 1, 2, 3))(*args)
    ref = jax.grad(lambda *a: jnp.sum(plain(*a) * weight), argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(swiglu_mlp(*args), plain(*args), rtol=1e-6, atol=1e-5)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
