"""Logical axis names -> mesh axes: the one table that decides how everything is sharded.

Parameters and activations carry logical axis names (see proxykd/models/transformer.py); the mesh
has the axes `data`, `fsdp` and `tensor`. Changing how a model is sharded is a change of this table
or of the config's mesh, never of model code.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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
  """A mesh with axes (data, fsdp, tensor); one size may be -1 (fills the remaining devices)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
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
    if devices.size % fixed:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {devices.size} devices are not a "
                       f"multiple of {fixed}")
    sizes[sizes.index(-1)] = devices.size // fixed
  if int(np.prod(sizes)) != devices.size:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{devices.size} are available")
  return Mesh(devices.reshape(sizes), MESH_AXES)


def logical_to_sharding(logical_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """Map a pytree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
