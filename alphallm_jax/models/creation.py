"""Model creation: abstract first, then parameters created directly in their final shardings."""

from __future__ import annotations

import jax
from flax import nnx

from alphallm_jax.models.config import ModelConfig
from alphallm_jax.models.decoder import Decoder
from alphallm_jax.models.sharding import ShardingRules, state_shardings


def abstract_model(cfg: ModelConfig, *, seed: int = 0) -> Decoder:
  """A Decoder whose parameters are ShapeDtypeStructs (no memory allocated)."""
  return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)))


def model_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh,
                    rules: ShardingRules = ShardingRules()):
  """(graphdef, abstract state, NamedSharding tree of the state) for `cfg` on `mesh`."""
  graphdef, abs_state = nnx.split(abstract_model(cfg))
  return graphdef, abs_state, state_shardings(abs_state, mesh, rules)


def create_model(cfg: ModelConfig, *, mesh: jax.sharding.Mesh | None = None,
                 rules: ShardingRules = ShardingRules(), seed: int = 0) -> Decoder:
  """A randomly initialised Decoder; on `mesh`, each parameter is born sharded.

  The init runs under `jax.jit` with out_shardings from the parameters' logical names, so no
  device ever holds a full unsharded copy.
  """
  if mesh is None:
    return Decoder(cfg, rngs=nnx.Rngs(seed))
  graphdef, _, shardings = model_shardings(cfg, mesh, rules)

  def init():
    return nnx.state(Decoder(cfg, rngs=nnx.Rngs(seed)))

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)
