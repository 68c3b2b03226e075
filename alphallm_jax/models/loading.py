"""`load_pretrained`: one entry point for HF directories and orbax checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from alphallm_jax.models.config import ModelConfig
from alphallm_jax.models.decoder import Decoder
from alphallm_jax.models.hf_io import CONFIG_FILE, load_hf_checkpoint
from alphallm_jax.models.sharding import ShardingRules
from alphallm_jax.models.tokenizer import Tokenizer

# Module import (not names): utils.checkpoint imports this package, so names resolve at call time.
from alphallm_jax.utils import checkpoint as orbax_checkpoint


def check_tokenizer_matches(tokenizer: Tokenizer, cfg: ModelConfig) -> None:
  """The tokenizer's ids must all index the model's embedding (a larger embedding is fine)."""
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"Tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                     f"embedding ({cfg.vocab_size}): wrong tokenizer for this checkpoint")


def load_pretrained(path: str | os.PathLike, dtype: str = "float32",
                    mesh: jax.sharding.Mesh | None = None,
                    rules: ShardingRules = ShardingRules()) -> tuple[Decoder, Tokenizer]:
  """(model, tokenizer) from an HF dir (config.json) or an orbax dir (model_config.json).

  The tokenizer files are read from the same directory; `model.cfg` is the ModelConfig.
  """
  path = Path(path)
  if (path / orbax_checkpoint.MODEL_CONFIG_FILE).is_file():
    model, cfg = orbax_checkpoint.restore_model(path, mesh=mesh, rules=rules, dtype=dtype, param_dtype=dtype)
  elif (path / CONFIG_FILE).is_file():
    model, cfg = load_hf_checkpoint(path, dtype=dtype, mesh=mesh, rules=rules)
  else:
    raise FileNotFoundError(f"{path} has neither {CONFIG_FILE} (HF checkpoint) nor "
                            f"{orbax_checkpoint.MODEL_CONFIG_FILE} (orbax checkpoint)")
  tokenizer = Tokenizer.from_dir(path)
  check_tokenizer_matches(tokenizer, cfg)
  return model, tokenizer
