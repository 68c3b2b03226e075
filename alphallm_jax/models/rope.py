"""Rotary position embeddings, split-half ("rotate_half") layout as in HF Llama/Mistral.

HF checkpoints store q/k projections in the split-half layout, so no weight permutation is needed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from alphallm_jax.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [head_dim // 2] including `linear` or `llama3` scaling."""
  dim = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  scaling = cfg.rope_scaling_dict
  if scaling is None:
    return inv_freq.astype(np.float32)
  factor = float(scaling["factor"])
  if scaling["rope_type"] == "linear":
    return (inv_freq / factor).astype(np.float32)
  # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between
  # interpolated smoothly (Llama 3.1 context extension).
  low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
  old_len = float(scaling["original_max_position_embeddings"])
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_angles(positions_bs: jax.Array, inv_freq_h: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [batch, seq, head_dim // 2] in float32."""
  angles_bsh = positions_bs.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h)
  return jnp.cos(angles_bsh), jnp.sin(angles_bsh)


def apply_rope(x_bsnh: jax.Array, cos_bsh: jax.Array, sin_bsh: jax.Array) -> jax.Array:
  """Rotates pairs (x[i], x[i + head_dim/2]) by the position angle; math in float32."""
  x1, x2 = jnp.split(x_bsnh.astype(jnp.float32), 2, axis=-1)
  cos, sin = cos_bsh[:, :, None, :], sin_bsh[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bsnh.dtype)
