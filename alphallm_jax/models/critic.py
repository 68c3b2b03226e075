"""The critic: a decoder backbone with three scalar heads (value, PRM, ORM), scored in one pass.

One forward of the backbone gives final-normed hidden states `[b, s, d]`; the heads are three small
MLPs applied at every position at once (`[b, s, c]`, c = 3 in `HEADS` order). Which position each
head is read at is the caller's choice: the value at the last token of a state, the PRM at the end of
every step, the ORM at the end of a complete solution (`critics.scoring` picks them). Because the
backbone is causal, the head outputs at position p are the scores of the prefix that ends at p, so
one pass over a full trajectory scores every prefix state, every step and the whole solution.

Heads output logits; `jax.nn.sigmoid` turns them into probabilities (value = expected final reward
in [0, 1], PRM = P(step is correct), ORM = P(final answer is correct)).

Parameters carry logical axis names like the decoder's (`embed`, `mlp`; the head axis is
replicated), so the critic shards over the same mesh with the same `ShardingRules`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import SingleDeviceSharding

from alphallm_jax.models.config import ModelConfig
from alphallm_jax.models.decoder import Decoder
from alphallm_jax.models.sharding import ShardingRules, param, shard_activation, state_shardings

HEADS = ("value", "prm", "orm")
HEAD_INDEX = {name: i for i, name in enumerate(HEADS)}
ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu, "relu": jax.nn.relu, "tanh": jnp.tanh}

CRITIC_CONFIG_FILE = "critic_config.json"
STATE_DIR = "state"


@dataclasses.dataclass(frozen=True)
class CriticHeadConfig:
  """The heads' shape: each head is `d -> hidden -> 1` with `activation` (hidden 0: linear head)."""

  hidden: int = 256
  activation: str = "silu"

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown critic head activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")
    if self.hidden < 0:
      raise ValueError(f"critic head hidden size must be >= 0, got {self.hidden}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class CriticHeads(nnx.Module):
  """Three MLP heads stacked on a leading head axis c: one einsum evaluates all of them."""

  def __init__(self, hidden_size: int, head_cfg: CriticHeadConfig, *, rngs: nnx.Rngs):
    d, m, c = hidden_size, head_cfg.hidden, len(HEADS)
    self.head_cfg = head_cfg
    if m:
      self.w_in_cdm = param(nnx.initializers.normal(d ** -0.5)(rngs.params(), (c, d, m), jnp.float32),
                            (None, "embed", "mlp"))
      self.b_in_cm = param(jnp.zeros((c, m), jnp.float32), (None, "mlp"))
      # Small output weights: every head starts near logit 0 (p = 0.5) for any input.
      self.w_out_cm = param(nnx.initializers.normal(0.01 * m ** -0.5)(rngs.params(), (c, m), jnp.float32),
                            (None, "mlp"))
    else:
      self.w_out_cd = param(nnx.initializers.normal(0.01 * d ** -0.5)(rngs.params(), (c, d), jnp.float32),
                            (None, "embed"))
    self.b_out_c = param(jnp.zeros((c,), jnp.float32), (None,))

  def __call__(self, hidden_bsd: jax.Array) -> jax.Array:
    """float32 logits [b, s, c] (c in HEADS order) from hidden states [b, s, d]."""
    x_bsd = hidden_bsd.astype(jnp.float32)
    if self.head_cfg.hidden:
      act = ACTIVATIONS[self.head_cfg.activation]
      h_bscm = act(jnp.einsum("bsd,cdm->bscm", x_bsd, self.w_in_cdm[...]) + self.b_in_cm[...])
      return jnp.einsum("bscm,cm->bsc", h_bscm, self.w_out_cm[...]) + self.b_out_c[...]
    return jnp.einsum("bsd,cd->bsc", x_bsd, self.w_out_cd[...]) + self.b_out_c[...]


class CriticModel(nnx.Module):
  """A `Decoder` backbone (its LM head unused) plus `CriticHeads`."""

  def __init__(self, backbone: Decoder, head_cfg: CriticHeadConfig, *, rngs: nnx.Rngs):
    self.backbone = backbone
    self.heads = CriticHeads(backbone.cfg.hidden_size, head_cfg, rngs=rngs)

  @property
  def model_cfg(self) -> ModelConfig:
    return self.backbone.cfg

  @property
  def head_cfg(self) -> CriticHeadConfig:
    return self.heads.head_cfg

  def __call__(self, input_ids_bs: jax.Array, *, positions_bs: jax.Array | None = None,
               read_bk: jax.Array | None = None) -> jax.Array:
    """Logits of every head at every position: float32 [b, s, c]. positions_bs: -1 on padding.

    With `read_bk` (int [b, k] sequence indices) only at those positions: [b, k, c]. Scoring reads a
    few positions per row, and the heads' [b, s, c, head_hidden] activations at every position cost
    more than the backbone's MLPs on a small model.
    """
    hidden_bsd, _ = self.backbone.hidden_states(input_ids_bs, positions_bs=positions_bs)
    if read_bk is not None:
      return self.heads(read_positions(hidden_bsd, read_bk))
    logits_bsc = self.heads(hidden_bsd)
    return shard_activation(logits_bsc, ("batch", "seq", None))


def read_positions(values_bsc: jax.Array, idx_bk: jax.Array) -> jax.Array:
  """values (or hidden states) at sequence indices idx_bk (int [b, k]) of each row: [b, k, c]."""
  return jnp.take_along_axis(values_bsc, idx_bk[:, :, None], axis=1)


# ------------------------------------------------------------------------------------- creation


def new_critic(model_cfg: ModelConfig, head_cfg: CriticHeadConfig, *, seed: int = 0) -> CriticModel:
  rngs = nnx.Rngs(seed)
  return CriticModel(Decoder(model_cfg, rngs=rngs), head_cfg, rngs=rngs)


def create_critic(model_cfg: ModelConfig, head_cfg: CriticHeadConfig, *, mesh: jax.sharding.Mesh | None = None,
                  rules: ShardingRules = ShardingRules(), seed: int = 0) -> CriticModel:
  """A randomly initialised critic; on `mesh`, each parameter is born sharded (abstract first)."""
  if mesh is None:
    return new_critic(model_cfg, head_cfg, seed=seed)
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: new_critic(model_cfg, head_cfg, seed=seed)))
  shardings = state_shardings(abs_state, mesh, rules)
  state = jax.jit(lambda: nnx.state(new_critic(model_cfg, head_cfg, seed=seed)), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def critic_from_policy(policy: Decoder, head_cfg: CriticHeadConfig, *, seed: int = 0,
                       mesh: jax.sharding.Mesh | None = None, rules: ShardingRules = ShardingRules()) -> CriticModel:
  """A critic whose backbone starts as a copy of the policy's parameters (heads fresh).

  The copy keeps each parameter's sharding; the policy is left untouched (the trainer donates the
  critic's buffers, so they must not alias the policy's). With the `mesh` the policy lives on, the fresh
  heads are placed on it too (born on the default device, they would leave a critic whose arrays sit on
  two device sets, which no jitted scoring accepts).
  """
  graphdef, state = nnx.split(policy)
  backbone = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  critic = CriticModel(backbone, head_cfg, rngs=nnx.Rngs(seed))
  if mesh is not None:
    heads = nnx.state(critic.heads)
    nnx.update(critic.heads, jax.device_put(heads, state_shardings(heads, mesh, rules)))
  return critic


# ---------------------------------------------------------------------------------- checkpoints


def save_critic(critic: CriticModel, path: str | os.PathLike, tokenizer=None) -> None:
  """Parameters (orbax) plus `critic_config.json` (backbone ModelConfig and head config), written last."""
  path = Path(path).absolute()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path / STATE_DIR, nnx.state(critic, nnx.Param), force=True)
    checkpointer.wait_until_finished()
  if jax.process_index() != 0:
    return
  if tokenizer is not None:
    tokenizer.save(path)
  record = {"model": critic.model_cfg.to_dict(), "heads": critic.head_cfg.to_dict()}
  tmp = path / (CRITIC_CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(record, indent=2))
  os.replace(tmp, path / CRITIC_CONFIG_FILE)


def load_critic(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                rules: ShardingRules = ShardingRules(), dtype: str | None = None) -> CriticModel:
  """Restores a `save_critic` directory directly into its shardings on `mesh`."""
  path = Path(path).absolute()
  config_path = path / CRITIC_CONFIG_FILE
  if not config_path.is_file() or not (path / STATE_DIR).is_dir():
    raise FileNotFoundError(f"no critic checkpoint ({CRITIC_CONFIG_FILE} + {STATE_DIR}/) at {path}; "
                            "train one with `alphallm train-critics`")
  record = json.loads(config_path.read_text())
  model_cfg = ModelConfig.from_dict(record["model"])
  if dtype:
    model_cfg = model_cfg.replace(dtype=dtype)
  head_cfg = CriticHeadConfig(**record["heads"])
  graphdef, abs_state = nnx.split(nnx.eval_shape(lambda: new_critic(model_cfg, head_cfg)))
  if mesh is None:
    device = SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, abs_state)
  else:
    shardings = state_shardings(abs_state, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, shardings)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(path / STATE_DIR, target)
  return nnx.merge(graphdef, state)
