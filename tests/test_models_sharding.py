"""Sharded model on a simulated 8-device mesh (fsdp=2, tensor=4): same logits, sharded params."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from alphallm_jax.models import (
  KVCache,
  ShardingRules,
  create_model,
  get_preset,
  load_hf_checkpoint,
  logical_to_spec,
  make_mesh,
  save_hf_checkpoint,
  shard_activation,
  state_shardings,
)

CFG = get_preset("tiny")  # 4 query heads, 2 KV heads
IDS = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 12))
forward = nnx.jit(lambda model, ids: model(ids))  # one function: its compilations are shared


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) >= 8, "tests/conftest.py must set jax_num_cpu_devices=8"
  return make_mesh(fsdp=2, tensor=4, devices=jax.devices()[:8])


@pytest.fixture(scope="module")
def reference():
  model = create_model(CFG, seed=7)
  return model, np.asarray(forward(model, jnp.asarray(IDS)))


@pytest.fixture(scope="module")
def sharded(mesh):
  return create_model(CFG, mesh=mesh, seed=7)


def test_mesh_axes_are_auto(mesh):
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="devices"):
    make_mesh(fsdp=3, devices=jax.devices()[:8])


def test_logical_to_spec_rules(mesh):
  rules = ShardingRules()
  assert logical_to_spec(("batch", "seq", None), rules) == P(("data", "fsdp"), None, None)
  assert logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  # 2 KV heads cannot be split 4 ways: that dimension stays replicated.
  assert logical_to_spec(("embed", "kv_heads", "head_dim"), rules, shape=(64, 2, 16),
                         mesh=mesh) == P("fsdp", None, None)
  # batch 1 cannot be split over fsdp = 2 (data has size 1 and divides anything).
  assert logical_to_spec(("batch", None), rules, shape=(1, 4), mesh=mesh) == P("data", None)
  # A mesh axis is used once per spec.
  assert logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), None)
  with pytest.raises(ValueError, match="Unknown logical axis"):
    logical_to_spec(("nope",), rules)


def test_shard_activation_is_noop_without_mesh():
  x = jnp.ones((2, 3))
  assert shard_activation(x, ("batch", None)) is x


def test_params_are_created_sharded(mesh, sharded):
  model = sharded
  gate = model.layers[0].gate_df[...]
  assert gate.sharding.spec == P("fsdp", "tensor")
  # Each device holds only its shard: [64/2, 128/4].
  assert {s.data.shape for s in gate.addressable_shards} == {(32, 32)}
  assert model.embed_vd[...].sharding.spec == P("tensor", "fsdp")
  assert model.layers[0].q_dnh[...].sharding.spec == P("fsdp", "tensor", None)
  assert model.layers[1].k_dkh[...].sharding.spec == P("fsdp", None, None)
  assert model.lm_head_dv[...].sharding.spec == P("fsdp", "tensor")
  # The logical names live in flax's `out_sharding` metadata; flax resolves them the same way.
  assert model.layers[0].gate_df.get_metadata()["out_sharding"] == ("embed", "mlp")
  with nnx.logical_axis_rules(ShardingRules().as_flax_rules()):
    flax_specs = nnx.get_partition_spec(nnx.state(model))
  assert flax_specs["layers"][0]["gate_df"].get_value() == P("fsdp", "tensor")
  ours = state_shardings(nnx.state(model), mesh)
  assert ours["layers"][0]["o_nhd"].get_value().spec == P("tensor", None, "fsdp")


def test_sharded_forward_matches_single_device(mesh, sharded, reference):
  _, ref_logits = reference
  model = sharded
  with jax.set_mesh(mesh):
    logits = forward(model, jnp.asarray(IDS))
  assert logits.sharding.spec == P("fsdp", None, "tensor")
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)


def test_sharded_cache_decode_matches_single_device(mesh, sharded, reference):
  _, ref_logits = reference
  graphdef, state = nnx.split(sharded)
  cache = KVCache.create(CFG, 2, 16, mesh=mesh)
  kv_shards = {s.data.shape for s in cache.k[0][0].addressable_shards}
  assert kv_shards == {(1, 2, 16, 16)}  # batch split over fsdp, 2 KV heads replicated

  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(state, cache, ids):
    return nnx.merge(graphdef, state)(ids, cache=cache)

  with jax.set_mesh(mesh):
    logits, cache = step(state, cache, jnp.asarray(IDS[:, :8]))
    np.testing.assert_allclose(logits, ref_logits[:, :8], atol=1e-5)
    for t in range(8, 12):
      logits, cache = step(state, cache, jnp.asarray(IDS[:, t:t + 1]))
      np.testing.assert_allclose(logits[:, 0], ref_logits[:, t], atol=1e-5)
  kv_shards = {s.data.shape for s in cache.k[0][0].addressable_shards}
  assert kv_shards == {(1, 2, 16, 16)}  # batch split over fsdp, 2 KV heads replicated


def test_hf_checkpoint_loads_onto_mesh(mesh, reference, tmp_path):
  model, ref_logits = reference
  save_hf_checkpoint(model, CFG, tmp_path)
  sharded, cfg = load_hf_checkpoint(tmp_path, mesh=mesh)
  assert sharded.layers[0].down_fd[...].sharding.spec == P("tensor", "fsdp")
  with jax.set_mesh(mesh):
    logits = forward(sharded, jnp.asarray(IDS))
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5)


def test_mesh_shapes_resolve_one_free_axis_and_reject_bad_sizes():
  from alphallm_jax.models.sharding import parse_mesh_shape, resolve_mesh_shape

  assert resolve_mesh_shape((-1, 1, 2), 8) == (4, 1, 2) and resolve_mesh_shape((1, 1, 1), 8) == (1, 1, 1)
  assert parse_mesh_shape(" 2, -1,2", 8) == (2, 2, 2)
  for sizes in ((-1, -1, 2), (0, 1, 1), (1, -2, 1), (1, 1)):
    with pytest.raises(ValueError, match="must be three positive integers"):
      resolve_mesh_shape(sizes, 8)
  for text in ("8", "1,1,x", "1,,1"):
    with pytest.raises(ValueError, match="expected three comma-separated integers"):
      parse_mesh_shape(text, 8)


def test_the_embedding_lookup_never_gathers_the_batchs_ids():
  """The table's hidden dim and the batch both split over fsdp: a plain lookup made XLA's partitioner
  gather every id and every row on every device ("involuntary full rematerialization"), at every
  decode step. The table is gathered over fsdp first (as FSDP gathers its weights), and the lookup is
  vocab-parallel over tensor: no int32 all-gather is left, and the hidden states match one device's."""
  import re

  mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
  model = create_model(CFG, mesh=mesh, seed=7)
  graphdef, state = nnx.split(model)
  ids = jax.device_put(jnp.asarray(np.tile(IDS, (4, 1))), jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None)))

  @jax.jit
  def hidden(state, ids):
    return nnx.merge(graphdef, state).hidden_states(ids)[0]

  with jax.set_mesh(mesh):
    compiled = hidden.lower(state, ids).compile()
    got = np.asarray(compiled(state, ids))
  assert not re.findall(r"s32\[[\d,]*\][^ ]* all-gather\(", compiled.as_text())
  want, _ = create_model(CFG, seed=7).hidden_states(jnp.asarray(np.tile(IDS, (4, 1))))
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
