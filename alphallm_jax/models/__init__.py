"""NNX Llama/Mistral decoder, KV cache, sharding rules, tokenizer and checkpoint IO."""

from alphallm_jax.models.config import ModelConfig
from alphallm_jax.models.creation import abstract_model, create_model, model_shardings
from alphallm_jax.models.decoder import Decoder, DecoderLayer
from alphallm_jax.models.hf_io import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from alphallm_jax.models.kv_cache import KVCache
from alphallm_jax.models.loading import check_tokenizer_matches, load_policy, load_pretrained
from alphallm_jax.models.presets import PRESETS, get_preset
from alphallm_jax.models.sharding import (
                                          MESH_AXES,
                                          ShardingRules,
                                          logical_to_spec,
                                          make_mesh,
                                          shard_activation,
                                          state_shardings,
)
from alphallm_jax.models.tokenizer import Tokenizer

__all__ = [
    "CheckpointError", "Decoder", "DecoderLayer", "KVCache", "MESH_AXES", "ModelConfig",
    "PRESETS", "ShardingRules", "Tokenizer", "abstract_model", "check_tokenizer_matches", "load_policy",
    "create_model", "get_preset", "load_hf_checkpoint", "load_pretrained", "logical_to_spec",
    "make_mesh", "model_shardings", "save_hf_checkpoint", "shard_activation", "state_shardings",
]
