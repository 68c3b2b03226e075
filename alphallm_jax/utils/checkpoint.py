"""Orbax save/restore of a Decoder's NNX state, plus its ModelConfig as JSON.

Layout of a checkpoint directory:
  state/              orbax StandardCheckpointer output (written to a tmp dir, then renamed)
  model_config.json   ModelConfig.to_dict(), written last (tmp file + rename)
  tokenizer files     optional, so `load_pretrained` finds everything in one place
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import SingleDeviceSharding

from alphallm_jax.models.config import ModelConfig
from alphallm_jax.models.creation import abstract_model
from alphallm_jax.models.decoder import Decoder
from alphallm_jax.models.sharding import ShardingRules, state_shardings

STATE_DIR = "state"
MODEL_CONFIG_FILE = "model_config.json"


def save_model(model: Decoder, cfg: ModelConfig, path: str | os.PathLike,
               tokenizer=None) -> None:
  """Saves parameters (orbax, sharded arrays written from every host) and model_config.json."""
  path = Path(path).absolute()
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"Tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                     f"embedding ({cfg.vocab_size})")
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path / STATE_DIR, nnx.state(model, nnx.Param), force=True)
    checkpointer.wait_until_finished()
  if jax.process_index() != 0:
    return
  if tokenizer is not None:
    tokenizer.save(path)
  tmp = path / (MODEL_CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
  os.replace(tmp, path / MODEL_CONFIG_FILE)


def read_model_config(path: str | os.PathLike) -> ModelConfig:
  path = Path(path)
  config_path = path / MODEL_CONFIG_FILE
  if not config_path.is_file() or not (path / STATE_DIR).is_dir():
    raise FileNotFoundError(f"No orbax model checkpoint ({MODEL_CONFIG_FILE} + {STATE_DIR}/) "
                            f"at {path}")
  return ModelConfig.from_dict(json.loads(config_path.read_text()))


def restore_model(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None,
                  rules: ShardingRules = ShardingRules(), dtype: str | None = None,
                  param_dtype: str | None = None) -> tuple[Decoder, ModelConfig]:
  """Restores a `save_model` checkpoint directly into the shardings `rules` give on `mesh`.

  dtype / param_dtype override the saved compute / parameter dtypes (parameters are cast on
  restore).
  """
  path = Path(path).absolute()
  cfg = read_model_config(path)
  cfg = cfg.replace(dtype=dtype or cfg.dtype, param_dtype=param_dtype or cfg.param_dtype)
  graphdef, abs_state = nnx.split(abstract_model(cfg))
  if mesh is None:
    device = SingleDeviceSharding(jax.local_devices()[0])  # this process's own device (multi-host)
    shardings = jax.tree.map(lambda _: device, abs_state)
  else:
    shardings = state_shardings(abs_state, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abs_state, shardings)
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(path / STATE_DIR, target)
  return nnx.merge(graphdef, state), cfg
