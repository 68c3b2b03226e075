"""Orbax save/restore of the NNX state (onto a mesh) and `load_pretrained` for both formats."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alphallm_jax.models import Tokenizer, create_model, get_preset, load_pretrained, make_mesh, save_hf_checkpoint
from alphallm_jax.utils.checkpoint import restore_model, save_model
from tests.helpers import MISTRAL_TOKENIZER, require_shared_data

CFG = get_preset("tiny", vocab_size=32000)  # room for the real Mistral tokenizer
IDS = np.random.RandomState(0).randint(0, 32000, (2, 10))


def logits_of(model):
  return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(IDS)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  model = create_model(CFG, seed=5)
  path = tmp_path_factory.mktemp("orbax") / "ckpt"
  save_model(model, CFG, path)
  return path, logits_of(model)


def test_restore_single_device(saved):
  path, ref = saved
  model, cfg = restore_model(path)
  assert cfg == CFG
  np.testing.assert_array_equal(logits_of(model), ref)


def test_restore_onto_mesh(saved):
  path, ref = saved
  mesh = make_mesh(fsdp=2, tensor=4, devices=jax.devices()[:8])
  model, _ = restore_model(path, mesh=mesh)
  assert model.layers[0].up_df[...].sharding.spec == P("fsdp", "tensor")
  assert {s.data.shape for s in model.layers[0].up_df[...].addressable_shards} == {(32, 32)}
  with jax.set_mesh(mesh):
    logits = logits_of(model)
  np.testing.assert_allclose(logits, ref, atol=1e-5)


def test_restore_casts_dtype(saved):
  path, _ = saved
  model, cfg = restore_model(path, dtype="bfloat16", param_dtype="bfloat16")
  assert cfg.dtype == "bfloat16" and model.embed_vd[...].dtype == jnp.bfloat16


def test_missing_checkpoint_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
    restore_model(tmp_path / "nothing")


def test_load_pretrained_both_formats(tmp_path):
  require_shared_data()
  tokenizer = Tokenizer.from_sentencepiece(MISTRAL_TOKENIZER)
  model = create_model(CFG, seed=6)
  ref = logits_of(model)
  save_model(model, CFG, tmp_path / "orbax", tokenizer=tokenizer)
  save_hf_checkpoint(model, CFG, tmp_path / "hf", tokenizer=tokenizer)
  for name in ("orbax", "hf"):
    loaded, tok = load_pretrained(tmp_path / name)
    assert tok.vocab_size == 32000 and tok.eos_ids == (2,)
    assert loaded.cfg.vocab_size == 32000
    np.testing.assert_allclose(logits_of(loaded), ref, atol=1e-6)
    # The configs' model.param_dtype (what `alphallm plan` sizes) is what the loaders store.
    half, _ = load_pretrained(tmp_path / name, dtype="float32", param_dtype="bfloat16")
    assert half.cfg.param_dtype == "bfloat16" and half.embed_vd[...].dtype == jnp.bfloat16
  with pytest.raises(FileNotFoundError, match="neither"):
    load_pretrained(tmp_path)


def test_an_hf_export_keeps_null_special_ids_through_write_read_write(tmp_path):
  import json

  from alphallm_jax.models import load_hf_checkpoint

  cfg = get_preset("tiny", vocab_size=64).replace(bos_token_id=None, eos_token_ids=(), pad_token_id=None)
  save_hf_checkpoint(create_model(cfg, seed=7), cfg, tmp_path / "first")
  loaded, loaded_cfg = load_hf_checkpoint(tmp_path / "first")
  assert loaded_cfg == cfg
  save_hf_checkpoint(loaded, loaded_cfg, tmp_path / "second")
  first, second = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("first", "second"))
  assert second == first
  assert (first["bos_token_id"], first["eos_token_id"], first["pad_token_id"]) == (None, None, None)
