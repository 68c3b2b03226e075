"""Mesh, logical-axis sharding rules and activation constraints.

Mesh axes are ("data", "fsdp", "tensor") with AxisType.Auto on purpose: the model code stays free
of explicit `out_sharding` plumbing through every einsum; XLA's sharding propagation works from the
annotated parameters (placed by `create_model` / the checkpoint loaders) plus a few activation
constraints (`shard_activation`). Explicit axes would make every op's output sharding part of its
type and force that plumbing through the decoder, the sampler and the trainers alike.

Every `nnx.Param` carries its logical axis names (e.g. ("embed", "mlp")) in flax's `out_sharding`
metadata, created with `eager_sharding=False` so that building a model never needs a mesh;
`ShardingRules` maps the logical names onto mesh axes when a mesh is chosen.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None


def resolve_mesh_shape(sizes: Sequence[int], device_count: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes with at most one -1, which takes the devices the other axes leave."""
  sizes = [int(s) for s in sizes]
  if len(sizes) != 3 or sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh (data, fsdp, tensor) sizes must be three positive integers, one of them "
                     f"may be -1; got {sizes}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    sizes[sizes.index(-1)] = max(1, device_count // known)
  return tuple(sizes)


def parse_mesh_shape(text: str, device_count: int) -> tuple[int, int, int]:
  """A "data,fsdp,tensor" command-line value (e.g. "1,1,8" or "-1,1,2") as resolved sizes."""
  try:
    sizes = [int(part) for part in text.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != 3:
    raise ValueError(f"mesh {text!r}: expected three comma-separated integers data,fsdp,tensor, "
                     f"e.g. 1,1,8 (one may be -1)")
  return resolve_mesh_shape(sizes, device_count)


def mesh_or_none(sizes: Sequence[int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh | None:
  """`make_mesh` over `devices` for (data, fsdp, tensor) `sizes` (one may be -1); None for 1, 1, 1 (one
  device, no mesh)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(sizes, len(devices))
  return None if shape == (1, 1, 1) else make_mesh(*shape, devices=devices)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ("data", "fsdp", "tensor") mesh with Auto axes over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if data * fsdp * tensor != len(devices):
    raise ValueError(
        f"mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} != {len(devices)} devices")
  return jax.make_mesh((data, fsdp, tensor), MESH_AXES,
                       axis_types=(AxisType.Auto,) * 3, devices=devices)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis name -> mesh axis (a name, a tuple of names, or None for replicated)."""

  batch: MeshAxes = ("data", "fsdp")
  vocab: MeshAxes = "tensor"
  embed: MeshAxes = "fsdp"
  q_heads: MeshAxes = "tensor"
  kv_heads: MeshAxes = "tensor"
  head_dim: MeshAxes = None
  mlp: MeshAxes = "tensor"
  seq: MeshAxes = None
  cache_seq: MeshAxes = None
  layers: MeshAxes = None
  norm: MeshAxes = None

  def mesh_axes(self, name: str | None) -> MeshAxes:
    if name is None:
      return None
    if name not in self.__dataclass_fields__:
      raise ValueError(f"Unknown logical axis {name!r}; known: {tuple(self.__dataclass_fields__)}")
    return getattr(self, name)

  def as_flax_rules(self) -> tuple[tuple[str, MeshAxes], ...]:
    """For `nnx.logical_axis_rules(...)`, so `nnx.get_partition_spec` resolves our names."""
    return tuple((f, getattr(self, f)) for f in self.__dataclass_fields__)


def batch_shards(mesh: jax.sharding.Mesh | None) -> int:
  """How many ways a batch is split on `mesh`: the (data, fsdp) devices (1 without a mesh)."""
  return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], rules: ShardingRules = ShardingRules(), *,
                    shape: Sequence[int] | None = None,
                    mesh: Any = None) -> PartitionSpec:
  """Logical names -> PartitionSpec.

  With `shape` and `mesh`, a dimension keeps only the leading mesh axes whose size product
  divides it (e.g. 2 KV heads on tensor=4 stay replicated), and a mesh axis is used at most once.
  """
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    axes = [a for a in _as_tuple(rules.mesh_axes(name)) if a not in used]
    if shape is not None and mesh is not None:
      sizes = dict(mesh.shape)
      while axes and shape[i] % math.prod(sizes[a] for a in axes):
        axes.pop()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec)


def current_mesh():
  """The mesh set with `jax.set_mesh`, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def shard_activation(x: jax.Array, names: Sequence[str | None],
                     rules: ShardingRules = ShardingRules()) -> jax.Array:
  """Constrains an activation's sharding when a mesh is set (`jax.set_mesh`); else a no-op."""
  mesh = current_mesh()
  if mesh is None:
    return x
  spec = logical_to_spec(names, rules, shape=x.shape, mesh=mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
  """An nnx.Param annotated with its logical axis names (no mesh needed to create it)."""
  if len(names) != value.ndim:
    raise ValueError(f"{len(names)} logical names {names} for a rank-{value.ndim} parameter")
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...]:
  names = variable.get_metadata().get("out_sharding")
  return tuple(names) if names else (None,) * len(variable.shape)


def state_shardings(state: Any, mesh: jax.sharding.Mesh,
                    rules: ShardingRules = ShardingRules()) -> Any:
  """NamedSharding tree (same structure as `state`) from each Variable's logical names."""

  def to_sharding(v):
    if isinstance(v, nnx.Variable):
      spec = logical_to_spec(logical_names(v), rules, shape=v.shape, mesh=mesh)
      return v.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
