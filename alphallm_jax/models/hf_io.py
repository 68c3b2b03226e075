"""Import and export of HF (transformers) Llama/Mistral checkpoints in safetensors format.

HF stores nn.Linear weights as [out, in]; our parameters are [in, ...out] with heads split out
(`q_dnh`), so every tensor goes through a small, shape-checked layout conversion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from alphallm_jax.models.config import ModelConfig
from alphallm_jax.models.creation import abstract_model
from alphallm_jax.models.decoder import Decoder
from alphallm_jax.models.sharding import ShardingRules, logical_names, logical_to_spec
from alphallm_jax.utils.distributed import fetch

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint that does not match the model it claims to be."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One HF tensor <-> one model parameter."""

  hf_name: str
  path: tuple[str | int, ...]          # attribute path inside the Decoder
  hf_shape: tuple[int, ...]
  to_param: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x):
  return x


def _transpose(x):
  return x.T


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
  """The full HF name <-> parameter table for `cfg`."""
  d, n, k, h, f, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.intermediate_size, cfg.vocab_size)

  def heads_in(heads):   # HF [heads*h, d] <-> ours [d, heads, h]
    return (lambda w: w.T.reshape(d, heads, h)), (lambda p: p.reshape(d, heads * h).T)

  q_in, q_out = heads_in(n)
  kv_in, kv_out = heads_in(k)
  specs = [TensorSpec("model.embed_tokens.weight", ("embed_vd",), (v, d), _identity, _identity)]
  for i in range(cfg.num_layers):
    pre = f"model.layers.{i}."
    lay = ("layers", i)
    specs += [
        TensorSpec(pre + "input_layernorm.weight", lay + ("attn_norm_d",), (d,),
                   _identity, _identity),
        TensorSpec(pre + "self_attn.q_proj.weight", lay + ("q_dnh",), (n * h, d), q_in, q_out),
        TensorSpec(pre + "self_attn.k_proj.weight", lay + ("k_dkh",), (k * h, d), kv_in, kv_out),
        TensorSpec(pre + "self_attn.v_proj.weight", lay + ("v_dkh",), (k * h, d), kv_in, kv_out),
        # HF o_proj [d, n*h] <-> ours [n, h, d]
        TensorSpec(pre + "self_attn.o_proj.weight", lay + ("o_nhd",), (d, n * h),
                   lambda w: w.T.reshape(n, h, d), lambda p: p.reshape(n * h, d).T),
        TensorSpec(pre + "post_attention_layernorm.weight", lay + ("mlp_norm_d",), (d,),
                   _identity, _identity),
        TensorSpec(pre + "mlp.gate_proj.weight", lay + ("gate_df",), (f, d), _transpose,
                   _transpose),
        TensorSpec(pre + "mlp.up_proj.weight", lay + ("up_df",), (f, d), _transpose, _transpose),
        TensorSpec(pre + "mlp.down_proj.weight", lay + ("down_fd",), (d, f), _transpose,
                   _transpose),
    ]
  specs.append(TensorSpec("model.norm.weight", ("final_norm_d",), (d,), _identity, _identity))
  if not cfg.tie_word_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head_dv",), (v, d), _transpose, _transpose))
  return specs


def variable_at(model: nnx.Module, path: tuple[str | int, ...]) -> nnx.Variable:
  node: Any = model
  for key in path:
    node = node[key] if isinstance(key, int) else getattr(node, key)
  return node


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  path = Path(path)
  config_path = path / CONFIG_FILE
  if not config_path.is_file():
    raise FileNotFoundError(f"No {CONFIG_FILE} in {path}: not an HF checkpoint directory")
  return json.loads(config_path.read_text())


class _TensorReader:
  """Reads named tensors as numpy (bf16 via ml_dtypes) from one file or an index of shards."""

  def __init__(self, path: Path):
    self.path = path
    if (path / INDEX_FILE).is_file():
      weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
      self.file_of = {name: path / fname for name, fname in weight_map.items()}
    elif (path / SINGLE_FILE).is_file():
      with safe_open(path / SINGLE_FILE, framework="numpy") as f:
        self.file_of = {name: path / SINGLE_FILE for name in f.keys()}
    else:
      raise FileNotFoundError(f"No {SINGLE_FILE} or {INDEX_FILE} in {path}")
    self._open: dict[Path, Any] = {}
    self._files = contextlib.ExitStack()

  def __enter__(self) -> _TensorReader:
    return self

  def __exit__(self, *exc) -> None:
    self._files.close()

  def get(self, name: str) -> np.ndarray:
    if name not in self.file_of:
      raise CheckpointError(f"Missing tensor {name!r} in checkpoint {self.path}")
    file = self.file_of[name]
    if file not in self._open:
      self._open[file] = self._files.enter_context(safe_open(file, framework="numpy"))
    return self._open[file].get_tensor(name)


def _place(value: np.ndarray, sharding: NamedSharding | None) -> jax.Array:
  if sharding is None:
    return jax.device_put(value)
  # Each device (and host) only materialises its own shard.
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def hf_param_dtype(path: str | os.PathLike) -> str:
  """The weights' dtype an HF checkpoint's config.json states (`dtype`, or the older `torch_dtype`), as
  this project stores parameters: bfloat16 stays bfloat16, anything else (float16 included) float32."""
  cfg = read_hf_config(Path(path))
  stated = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
  return "bfloat16" if stated == "bfloat16" else "float32"


def load_hf_checkpoint(path: str | os.PathLike, *, dtype: str = "float32",
                       param_dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                       rules: ShardingRules = ShardingRules()) -> tuple[Decoder, ModelConfig]:
  """Loads config.json + safetensors (single or sharded) into a Decoder, sharded on `mesh`."""
  path = Path(path)
  cfg = ModelConfig.from_hf_config(read_hf_config(path), param_dtype=param_dtype or dtype,
                                   dtype=dtype)
  model = abstract_model(cfg)
  with _TensorReader(path) as reader:
    for spec in tensor_specs(cfg):
      raw = reader.get(spec.hf_name)
      if tuple(raw.shape) != spec.hf_shape:
        raise CheckpointError(f"Tensor {spec.hf_name!r} in {path} has shape "
                              f"{tuple(raw.shape)}, expected {spec.hf_shape}")
      variable = variable_at(model, spec.path)
      value = np.ascontiguousarray(spec.to_param(raw).astype(cfg.param_dtype))
      assert value.shape == variable.shape, (spec.hf_name, value.shape, variable.shape)
      sharding = None
      if mesh is not None:
        pspec = logical_to_spec(logical_names(variable), rules, shape=value.shape, mesh=mesh)
        sharding = NamedSharding(mesh, pspec)
      variable.set_value(_place(value, sharding))
  unset = [p for p, v in nnx.to_flat_state(nnx.state(model))
           if not isinstance(v.get_value(), jax.Array)]
  if unset:
    raise CheckpointError(f"Parameters not loaded from {path}: {unset}")
  return model, cfg


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
  """`write` to a temporary name, then renamed: flushed to disk first, so that a completion marker written
  after it never survives a crash (power loss, not only kill -9) that the file does not."""
  tmp = path.with_name(path.name + ".tmp")
  write(tmp)
  with open(tmp, "rb") as f:
    os.fsync(f.fileno())
  os.replace(tmp, path)


def save_hf_checkpoint(model: Decoder, cfg: ModelConfig, path: str | os.PathLike,
                       tokenizer=None, max_shard_bytes: int = 4 << 30) -> None:
  """Writes config.json, safetensors (sharded with an index above max_shard_bytes), tokenizer.

  transformers' `AutoModelForCausalLM.from_pretrained(path)` loads the result.
  """
  path = Path(path)
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"Tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the model's "
                     f"embedding ({cfg.vocab_size})")
  # Shards planned from the shapes, then filled one at a time: a host holds one shard (at most
  # max_shard_bytes) and the tensor being gathered, never the whole model (140 GB for a 70B in bf16).
  itemsize = np.dtype(cfg.param_dtype).itemsize
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in tensor_specs(cfg):
    nbytes = int(np.prod(spec.hf_shape)) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  writer = jax.process_index() == 0
  if writer:
    path.mkdir(parents=True, exist_ok=True)
    for stale in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
      stale.unlink(missing_ok=True)
  metadata = {"format": "pt"}
  names = [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                    for i in range(len(shards))]
  weight_map, total = {}, 0
  for fname, specs in zip(names, shards):
    tensors = {}
    for spec in specs:  # every process gathers (a collective); only process 0 keeps and writes
      value = spec.to_hf(fetch(variable_at(model, spec.path)[...]))
      if writer:
        tensors[spec.hf_name] = np.ascontiguousarray(value.astype(cfg.param_dtype))
      del value
    if writer:
      _write_atomic(path / fname, lambda p, t=tensors: save_file(t, str(p), metadata=metadata))
      weight_map.update({name: fname for name in tensors})
      total += sum(v.nbytes for v in tensors.values())
    del tensors
  if not writer:
    return
  if len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_atomic(path / INDEX_FILE, lambda p: p.write_text(json.dumps(index, indent=2)))
  if tokenizer is not None:
    tokenizer.save(path)
  _write_atomic(path / CONFIG_FILE,
                lambda p: p.write_text(json.dumps(cfg.to_hf_config(), indent=2)))
