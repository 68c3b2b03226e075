"""ModelConfig <-> HF config.json, RoPE frequencies against transformers, presets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from alphallm_jax.models import PRESETS, ModelConfig, get_preset
from alphallm_jax.models.rope import inv_frequencies

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4)


def test_reads_transformers_llama_config():
  d = transformers.LlamaConfig(**SMALL, num_key_value_heads=2, eos_token_id=[5, 6],
                               rope_parameters={"rope_type": "default", "rope_theta": 5e5}).to_dict()
  cfg = ModelConfig.from_hf_config(d, param_dtype="bfloat16", dtype="bfloat16")
  assert (cfg.vocab_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
      300, 3, 4, 2, 16)
  assert cfg.rope_theta == 5e5 and cfg.rope_scaling is None
  assert cfg.eos_token_ids == (5, 6) and cfg.architecture == "llama"
  assert cfg.param_dtype == "bfloat16" and cfg.sliding_window is None


def test_reads_legacy_rope_spelling_and_defaults():
  d = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 32,
       "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
       "rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
       "eos_token_id": 7}
  cfg = ModelConfig.from_hf_config(d)
  assert cfg.head_dim == 8 and cfg.num_kv_heads == 4  # absent -> hidden/heads, heads
  assert cfg.rope_theta == 500000.0 and cfg.eos_token_ids == (7,)
  assert cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
  hash(cfg)  # usable as a static jit argument


def test_reads_mistral_config_with_window():
  d = transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=32).to_dict()
  cfg = ModelConfig.from_hf_config(d)
  assert cfg.architecture == "mistral" and cfg.sliding_window == 32


@pytest.mark.parametrize("arch,hf_config", [("MistralForCausalLM", transformers.MistralConfig),
                                            ("LlamaForCausalLM", transformers.LlamaConfig)])
def test_keys_a_config_leaves_out_take_the_architectures_transformers_defaults(arch, hf_config):
  """A trimmed config.json (no window, KV heads or context length) reads as transformers reads it: a
  Mistral-7B-v0.1 file without `sliding_window` still slides a 4096-token window."""
  d = {"architectures": [arch], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 64,
       "num_hidden_layers": 1, "num_attention_heads": 16}
  ours, theirs = ModelConfig.from_hf_config(d), hf_config(**{k: v for k, v in d.items() if k != "architectures"})
  assert ours.num_kv_heads == theirs.num_key_value_heads
  assert ours.max_position_embeddings == theirs.max_position_embeddings
  assert ours.sliding_window == getattr(theirs, "sliding_window", None)


def test_unknown_architecture_is_named():
  d = transformers.GPT2Config().to_dict()
  with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
    ModelConfig.from_hf_config({**d, "architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(ValueError, match="attention_bias"):
    ModelConfig.from_hf_config({**transformers.LlamaConfig(**SMALL).to_dict(),
                                "attention_bias": True})
  with pytest.raises(ValueError, match="dynamic"):
    ModelConfig.from_hf_config({**transformers.LlamaConfig(**SMALL).to_dict(),
                                "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})


def test_null_special_ids_stay_null_through_read_and_export():
  d = transformers.LlamaConfig(**SMALL, bos_token_id=None, eos_token_id=None, pad_token_id=None).to_dict()
  assert (d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (None, None, None)
  cfg = ModelConfig.from_hf_config(d)
  assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (None, (), None)  # none invented
  out = cfg.to_hf_config()
  assert (out["bos_token_id"], out["eos_token_id"], out["pad_token_id"]) == (None, None, None)
  assert ModelConfig.from_hf_config(out) == cfg
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # the orbax record too
  hf_cfg = transformers.LlamaConfig.from_dict(out)
  assert (hf_cfg.bos_token_id, hf_cfg.eos_token_id, hf_cfg.pad_token_id) == (None, None, None)


def test_absent_special_ids_take_transformers_defaults():
  d = {k: v for k, v in transformers.LlamaConfig(**SMALL).to_dict().items()
       if k not in ("bos_token_id", "eos_token_id", "pad_token_id")}
  cfg = ModelConfig.from_hf_config(d)
  hf_default = transformers.LlamaConfig(**SMALL)
  assert cfg.bos_token_id == hf_default.bos_token_id == 1
  assert cfg.eos_token_ids == (hf_default.eos_token_id,) == (2,)
  assert cfg.pad_token_id is hf_default.pad_token_id is None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_roundtrip_through_transformers(name):
  cfg = PRESETS[name]
  hf_dict = cfg.to_hf_config()
  config_cls = transformers.MistralConfig if cfg.architecture == "mistral" else (
      transformers.LlamaConfig)
  hf_cfg = config_cls.from_dict(hf_dict)
  assert hf_cfg.head_dim == cfg.head_dim and hf_cfg.num_key_value_heads == cfg.num_kv_heads
  assert ModelConfig.from_hf_config(hf_cfg.to_dict()) == cfg
  assert ModelConfig.from_hf_config(hf_dict) == cfg
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_published_parameter_counts():
  assert get_preset("llama2_7b").param_count() == 6_738_415_616
  assert get_preset("llama2_13b").param_count() == 13_015_864_320
  assert get_preset("llama2_70b").param_count() == 68_976_648_192
  assert get_preset("mistral_7b").param_count() == 7_241_732_096
  assert get_preset("llama3_8b").param_count() == 8_030_261_248
  bench = get_preset("bench_30m")
  assert (bench.hidden_size, bench.num_layers, bench.num_heads, bench.num_kv_heads,
          bench.intermediate_size, bench.vocab_size) == (512, 8, 8, 4, 1408, 4096)
  assert get_preset("tiny", dtype="bfloat16").dtype == "bfloat16"
  with pytest.raises(ValueError, match="available"):
    get_preset("gpt5")


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_frequencies_match_transformers(scaling):
  hf_cfg = transformers.LlamaConfig(**SMALL, head_dim=32, max_position_embeddings=512,
                                    rope_parameters={**scaling, "rope_theta": 10000.0})
  ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_cfg, torch.device("cpu"))
  ours = inv_frequencies(ModelConfig.from_hf_config(hf_cfg.to_dict()))
  np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
  plain = inv_frequencies(ModelConfig.from_hf_config(hf_cfg.to_dict()).replace(rope_scaling=None))
  assert not np.allclose(ours, plain)


def test_an_exported_config_spells_rope_scaling_both_ways():
  # transformers 5 reads `rope_parameters`, 4.x only `rope_scaling`: a scaled export carries both.
  cfg = ModelConfig.from_hf_config({**transformers.LlamaConfig(**SMALL).to_dict(), "rope_parameters": {
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64, "rope_theta": 5e5}})
  out = cfg.to_hf_config()
  assert out["rope_scaling"] == cfg.rope_scaling_dict and out["rope_scaling"]["rope_type"] == "llama3"
  assert {k: v for k, v in out["rope_parameters"].items() if k != "rope_theta"} == out["rope_scaling"]
  assert ModelConfig.from_hf_config(out) == cfg
  assert transformers.LlamaConfig.from_dict(out).to_dict()["rope_parameters"]["factor"] == 8.0
  assert "rope_scaling" not in PRESETS["llama2_7b"].to_hf_config()  # nothing to scale, nothing written
