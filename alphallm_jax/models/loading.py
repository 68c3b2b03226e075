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

MAX_EMBEDDING_PADDING = 0.1  # the share of a model's embedding rows its tokenizer may leave unused


def check_tokenizer_matches(tokenizer: Tokenizer, cfg: ModelConfig, where: str | os.PathLike = "") -> None:
  """The tokenizer's ids must all index the model's embedding, which may be padded past them by a little
  (checkpoints round it up: Qwen2 by 0.2-0.6%, Phi-2 by 1.8%), not by more than a tenth: a 32k
  sentencepiece tokenizer beside a 128k model shares its BOS id 1 and fits the embedding, yet means
  other text by every id. Both must name the same BOS token: a Llama-2 tokenizer (BOS 1) beside a
  Llama-3 model (BOS 128000) fits the embedding, yet starts every prompt with a token the model never
  saw there."""
  at = f" in {where}" if where else ""
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"Tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                     f"embedding ({cfg.vocab_size}){at}: wrong tokenizer for this checkpoint")
  if tokenizer.vocab_size < cfg.vocab_size * (1 - MAX_EMBEDDING_PADDING):
    raise ValueError(f"Tokenizer vocabulary ({tokenizer.vocab_size}) covers under "
                     f"{1 - MAX_EMBEDDING_PADDING:.0%} of the model's embedding ({cfg.vocab_size}){at}: "
                     f"wrong tokenizer for this checkpoint")
  if cfg.bos_token_id is not None and tokenizer.bos_id is not None and tokenizer.bos_id != cfg.bos_token_id:
    raise ValueError(f"Tokenizer BOS id {tokenizer.bos_id} differs from the model's bos_token_id "
                     f"{cfg.bos_token_id}{at}: wrong tokenizer for this checkpoint")


def load_policy(cfg, path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None) -> tuple[Decoder, Tokenizer]:
  """The configured policy (or fast-rollout policy) at `path`: `model.dtype` compute, `model.param_dtype`
  parameters, as `alphallm plan` sizes it."""
  return load_pretrained(path, dtype=cfg.model.dtype, mesh=mesh, param_dtype=cfg.model.param_dtype)


def load_pretrained(path: str | os.PathLike, dtype: str = "float32",
                    mesh: jax.sharding.Mesh | None = None,
                    rules: ShardingRules = ShardingRules(),
                    param_dtype: str | None = None) -> tuple[Decoder, Tokenizer]:
  """(model, tokenizer) from an HF dir (config.json) or an orbax dir (model_config.json).

  `dtype` is the compute dtype, `param_dtype` the stored parameters' (default: `dtype`; the configs'
  `model.dtype` and `model.param_dtype`). The tokenizer files are read from the same directory;
  `model.cfg` is the ModelConfig.
  """
  param_dtype = param_dtype or dtype
  path = Path(path)
  if (path / orbax_checkpoint.MODEL_CONFIG_FILE).is_file():
    model, cfg = orbax_checkpoint.restore_model(path, mesh=mesh, rules=rules, dtype=dtype, param_dtype=param_dtype)
  elif (path / CONFIG_FILE).is_file():
    model, cfg = load_hf_checkpoint(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh, rules=rules)
  else:
    raise FileNotFoundError(f"{path} has neither {CONFIG_FILE} (HF checkpoint) nor "
                            f"{orbax_checkpoint.MODEL_CONFIG_FILE} (orbax checkpoint)")
  tokenizer = Tokenizer.from_dir(path)
  check_tokenizer_matches(tokenizer, cfg, path)
  return model, tokenizer
