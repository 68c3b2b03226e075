"""Model configuration shared by the decoder, the KV cache, checkpoint IO and the sampler.

One frozen dataclass covers Llama 1/2/3/3.1, Mistral v0.1 and small Llama-architecture models.
It is hashable (rope_scaling is a tuple of pairs), so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# HF `architectures` entry -> our architecture name.
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
SUPPORTED_ARCHITECTURES = tuple(HF_ARCHITECTURES)
_HF_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# RoPE variants the decoder implements ("default" means no scaling).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# transformers' LlamaConfig / MistralConfig defaults for keys a config.json may leave out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 131072, "sliding_window": 4096, "num_key_value_heads": 8},
}


def _freeze_rope_scaling(scaling: dict | None) -> tuple[tuple[str, Any], ...] | None:
  """dict -> sorted tuple of pairs (hashable); drops rope_theta, which has its own field."""
  if not scaling:
    return None
  items = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")}
  if float(items.pop("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("partial_rotary_factor != 1 is not supported")
  items.setdefault("rope_type", scaling.get("type", "default"))
  if items["rope_type"] == "default":
    return None
  if items["rope_type"] not in SUPPORTED_ROPE_TYPES:
    raise ValueError(
        f"Unsupported rope_scaling type {items['rope_type']!r}; supported: {SUPPORTED_ROPE_TYPES}")
  return tuple(sorted(items.items()))


def _hf_eos_token_id(eos_token_ids: tuple[int, ...]) -> int | list[int] | None:
  """HF's `eos_token_id`: one id, a list of several, or `null` for none (an empty list is no HF form)."""
  if not eos_token_ids:
    return None
  return eos_token_ids[0] if len(eos_token_ids) == 1 else list(eos_token_ids)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a Llama/Mistral decoder."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-5
  sliding_window: int | None = None
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  # None where the checkpoint names none (HF `null`): kept as such, so an export writes `null` back.
  bos_token_id: int | None = 1
  eos_token_ids: tuple[int, ...] = (2,)
  pad_token_id: int | None = 0
  param_dtype: str = "float32"
  dtype: str = "float32"
  architecture: str = "llama"
  # Training only: each layer keeps its input and recomputes the rest in the backward pass (one layer's
  # intermediates at a time instead of every layer's). The trainer sets it from its `remat` on its own
  # copy of the graph, whose forward passes (DPO's reference log-probabilities, CPL's policy gap, the
  # trainer's evaluation) then run the same scan: equal in float32, within rounding in bfloat16. The
  # model's own config, its checkpoints and the samplers never have it.
  remat: bool = False

  def __post_init__(self):
    if self.architecture not in _HF_MODEL_TYPES:
      raise ValueError(
          f"Unknown architecture {self.architecture!r}; supported: {tuple(_HF_MODEL_TYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for split-half RoPE")
    if isinstance(self.rope_scaling, dict):  # accept a dict, store the hashable form
      object.__setattr__(self, "rope_scaling", _freeze_rope_scaling(self.rope_scaling))
    if isinstance(self.eos_token_ids, (list, int)):
      ids = (self.eos_token_ids,) if isinstance(self.eos_token_ids, int) else self.eos_token_ids
      object.__setattr__(self, "eos_token_ids", tuple(ids))
    if self.rope_scaling is not None:
      rope_type = self.rope_scaling_dict.get("rope_type")
      if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"Unsupported rope_scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  def replace(self, **changes) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def param_count(self) -> int:
    """Number of parameters (embedding, untied LM head, layers, final norm)."""
    d, v, i = self.hidden_size, self.vocab_size, self.intermediate_size
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * i + 2 * d
    head = 0 if self.tie_word_embeddings else v * d
    return v * d + head + self.num_layers * per_layer + d

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict (used by orbax checkpoints' model_config.json)."""
    out = dataclasses.asdict(self)
    out["rope_scaling"] = self.rope_scaling_dict
    out["eos_token_ids"] = list(self.eos_token_ids)
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"Unknown ModelConfig fields: {sorted(unknown)}")
    d = dict(d)
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", (2,)))
    return cls(**d)

  @classmethod
  def from_hf_config(cls, d: dict[str, Any], *, param_dtype: str = "float32",
                     dtype: str = "float32") -> ModelConfig:
    """Reads a transformers LlamaConfig / MistralConfig dict (config.json)."""
    archs = d.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if not archs and d.get("model_type") in _HF_MODEL_TYPES:  # e.g. LlamaConfig().to_dict()
      arch = d["model_type"]
    if arch is None:
      raise ValueError(
          f"Unsupported architecture {archs or d.get('model_type')!r}; "
          f"supported: {SUPPORTED_ARCHITECTURES}")
    if d.get("hidden_act", "silu") != "silu":
      raise ValueError(f"Unsupported hidden_act {d['hidden_act']!r}; only 'silu' (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
      if d.get(flag):
        raise ValueError(f"Unsupported {flag}=True: the decoder has no projection biases")
    # A key the file leaves out takes the architecture's transformers default, as transformers reads it.
    defaults = _HF_DEFAULTS[arch]
    # transformers 5 keeps rope_theta inside `rope_parameters`; older configs use
    # top-level `rope_theta` and `rope_scaling`.
    rope_params = dict(d.get("rope_parameters") or {})
    rope_scaling = dict(d.get("rope_scaling") or rope_params)
    rope_theta = rope_params.get("rope_theta", d.get("rope_theta", 10000.0))
    if rope_scaling.get("rope_type", rope_scaling.get("type")) == "llama3":
      rope_scaling.setdefault("original_max_position_embeddings",
                              d.get("max_position_embeddings", defaults["max_position_embeddings"]))
    heads = d["num_attention_heads"]
    # A missing special id takes transformers' LlamaConfig default (bos 1, eos 2, pad none); a `null`
    # one stays none: inventing an id would write it into the next export.
    eos = d.get("eos_token_id", 2)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    # Mistral's window is a sliding window only when shorter than the context: HF configs of
    # later Mistral versions carry `sliding_window: null`.
    window = d.get("sliding_window", defaults["sliding_window"]) if arch == "mistral" else None
    return cls(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads", defaults.get("num_key_value_heads")) or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rope_theta=float(rope_theta),
        rope_scaling=_freeze_rope_scaling(rope_scaling),
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        sliding_window=window,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=d.get("max_position_embeddings", defaults["max_position_embeddings"]),
        bos_token_id=d.get("bos_token_id", 1),
        eos_token_ids=eos_ids,
        pad_token_id=d.get("pad_token_id"),
        param_dtype=param_dtype,
        dtype=dtype,
        architecture=arch,
    )

  def to_hf_config(self) -> dict[str, Any]:
    """A config.json dict that transformers loads as LlamaConfig / MistralConfig."""
    rope_parameters = {"rope_type": "default", **(self.rope_scaling_dict or {}),
                       "rope_theta": self.rope_theta}
    out = {
        "architectures": [_HF_MODEL_TYPES[self.architecture]],
        "model_type": self.architecture,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": _hf_eos_token_id(self.eos_token_ids),
        "pad_token_id": self.pad_token_id,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": self.param_dtype,
        "torch_dtype": self.param_dtype,
    }
    if self.rope_scaling_dict:
      # transformers 4.x reads scaling from `rope_scaling` only (5.x from `rope_parameters`): without it a
      # 4.x load of a Llama-3.1-style export would run plain RoPE.
      out["rope_scaling"] = dict(self.rope_scaling_dict)
    if self.architecture == "mistral":
      out["sliding_window"] = self.sliding_window
    return out
