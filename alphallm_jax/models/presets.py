"""Named ModelConfigs: a tiny test model, a ~30M benchmark model and published Llama/Mistral shapes.
"""

from __future__ import annotations

from alphallm_jax.models.config import ModelConfig

_LLAMA2 = dict(vocab_size=32000, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-5,
               max_position_embeddings=4096, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
_LLAMA3 = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
               num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
               rms_norm_eps=1e-5, bos_token_id=128000, eos_token_ids=(128001, 128009),
               pad_token_id=128001)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512),
    # The demo's base policy shape (configs/demo_arith.py, with its tokenizer's 768 tokens), for benchmarks.
    "demo_policy": ModelConfig(vocab_size=768, hidden_size=128, intermediate_size=384, num_layers=4,
                               num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=512,
                               tie_word_embeddings=True),
    "bench_30m": ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408,
                             num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                             max_position_embeddings=2048),
    "llama2_7b": ModelConfig(hidden_size=4096, intermediate_size=11008, num_layers=32,
                             num_heads=32, num_kv_heads=32, **_LLAMA2),
    "llama2_13b": ModelConfig(hidden_size=5120, intermediate_size=13824, num_layers=40,
                              num_heads=40, num_kv_heads=40, **_LLAMA2),
    "llama2_70b": ModelConfig(hidden_size=8192, intermediate_size=28672, num_layers=80,
                              num_heads=64, num_kv_heads=8, **_LLAMA2),
    # Mistral 7B v0.1: GQA and a 4096-token sliding window.
    "mistral_7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                              rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096,
                              max_position_embeddings=32768, bos_token_id=1,
                              eos_token_ids=(2,), pad_token_id=0, architecture="mistral"),
    "llama3_8b": ModelConfig(max_position_embeddings=8192, **_LLAMA3),
    # Llama 3.1 8B: same shapes, 128k context through llama3 RoPE scaling.
    "llama3_1_8b": ModelConfig(
        max_position_embeddings=131072,
        rope_scaling=(("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                      ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
        **_LLAMA3),
}


def get(name: str, **overrides) -> ModelConfig:
  """The preset `name`, with field overrides (e.g. dtype="bfloat16")."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; available: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


get_preset = get
