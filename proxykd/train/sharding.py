"""Logical axis names -> mesh axes: the one table that decides how everything is sharded.

Parameters and activations carry logical axis names (see proxykd/models/transformer.py); the mesh
has the axes `data`, `fsdp` and `tensor`. Changing how a model is sharded is a change of this table
or of the config's mesh, never of model code.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or axes or None). The first rule whose mesh axes are still free wins.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters: FSDP shards the embed dimension, tensor parallelism the heads / mlp / vocab.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
    # Activations.
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def make_mesh(shape: dict[str, int] | Sequence[int], devices=None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor); one size may be -1 (fills the remaining devices).

  Without `devices` the mesh comes from `jax.make_mesh`, which lays the axes out over every device
  following the physical topology (on TPU the last axes, tensor then fsdp, get the fastest links);
  an explicit device list is reshaped in the order given (the caller chose it). The axes are Auto:
  shardings follow the logical rules and constraints (GSPMD), not explicit-sharding types.
  """
  listed = list(jax.devices() if devices is None else devices)
  if isinstance(shape, dict):
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
      raise KeyError(f"mesh: unknown axis name(s) {unknown}; the axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(listed) % fixed:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(listed)} devices are not a "
                       f"multiple of {fixed}")
    sizes[sizes.index(-1)] = len(listed) // fixed
  if int(np.prod(sizes)) != len(listed):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{len(listed)} are available")
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if devices is None:
    try:
      return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto)
    except ValueError as e:  # E.g. a multi-slice TPU topology, which jax.make_mesh refuses.
      logging.warning("mesh: jax.make_mesh(%s) refused (%s); using the devices in their order",
                      sizes, e)
  return Mesh(np.asarray(listed).reshape(sizes), MESH_AXES, axis_types=auto)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """Map a pytree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- from the config
BATCH_AXES = ("data", "fsdp")  # The batch dimension of every input is split over these axes.


def mesh_from_config(mesh_cfg, devices=None) -> Mesh:
  """The mesh named by a `config.mesh` block ({data, fsdp, tensor}, one may be -1)."""
  shape = dict(mesh_cfg.to_dict() if hasattr(mesh_cfg, "to_dict") else mesh_cfg)
  try:
    return make_mesh(shape, devices)
  except (KeyError, ValueError) as e:
    raise ValueError(f"config.mesh: {str(e).strip(chr(34) + chr(39))}") from None


def batch_divisor(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def validate_mesh(mesh: Mesh, models, global_batch: int, grad_accum: int = 1) -> None:
  """Refuse, before compiling, a batch or any model that does not divide the mesh.

  `models`: one ModelConfig, or {name: ModelConfig} for every model the step reads (the trained
  one and frozen ones such as a proxy), named in the error.
  """
  sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
  div = batch_divisor(mesh)
  if grad_accum < 1 or global_batch % grad_accum:
    raise ValueError(f"config.train.batch_size={global_batch} is not a multiple of "
                     f"config.train.grad_accum={grad_accum}")
  micro = global_batch // grad_accum
  if micro % div:
    raise ValueError(
        f"the micro-batch of {micro} rows (config.train.batch_size={global_batch} / grad_accum="
        f"{grad_accum}) does not divide over data x fsdp = {div} devices of the mesh ({sizes})")
  tensor = mesh.shape["tensor"]
  for name, cfg in (models.items() if isinstance(models, dict) else [("model", models)]):
    for key in ("num_heads", "num_kv_heads", "intermediate_size"):
      value = getattr(cfg, key)
      if value % tensor:
        raise ValueError(f"config.{name}.{key}={value} is not a multiple of the mesh's tensor "
                         f"axis ({sizes})")


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Rows over (data, fsdp); the other dimensions whole."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def param_shardings(cfg, mesh: Mesh):
  """NamedShardings of the model parameters (unboxed tree), from the logical rules."""
  from proxykd.models.transformer import logical_axes  # pylint: disable=g-import-not-at-top
  return logical_to_sharding(logical_axes(cfg), mesh)


def shardings_like(tree, params, param_sh, mesh: Mesh):
  """Shardings for a tree (e.g. optimizer state) whose param-shaped leaves mirror `params`.

  A leaf whose key path ends with a parameter's path and has that parameter's shape gets the
  parameter's sharding (Adam moments, accumulated gradients); anything else is replicated.
  """
  by_path = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                              jax.tree_util.tree_leaves(param_sh)):
    by_path[tuple(path)] = (tuple(leaf.shape), sh)
  rep = replicated(mesh)

  def pick(path, leaf):
    path = tuple(path)
    for i in range(len(path)):
      hit = by_path.get(path[i:])
      if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
        return hit[1]
    return rep

  return jax.tree_util.tree_map_with_path(pick, tree)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules=LOGICAL_RULES):
  """The mesh and logical rules that the model's activation constraints resolve against.

  Trace and compile the step inside it (proxykd/train/step.py `compile_step` does).
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(rules)):
    yield
