"""The train state: step, parameters, optimizer state and RNG, all one pytree, and its shardings."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from proxykd.models.config import ModelConfig
from proxykd.models.transformer import abstract_params, init_params
from proxykd.train import sharding as shd


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done so far.
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2]; each step folds in its step number.


def _make(params, tx: optax.GradientTransformation, rng) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng)


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
  params = abstract_params(cfg)
  return jax.eval_shape(lambda p: _make(p, tx, jax.random.PRNGKey(0)), params)


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """NamedShardings of every leaf: params by the logical rules, optimizer state like the params."""
  abstract = abstract_state(cfg, tx)
  param_sh = shd.param_shardings(cfg, mesh)
  rep = shd.replicated(mesh)
  return TrainState(step=rep, params=param_sh,
                    opt_state=shd.shardings_like(abstract.opt_state, abstract.params, param_sh, mesh),
                    rng=rep)


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying the target shardings (for compiling and for restoring)."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int,
               params=None) -> TrainState:
  """A fresh state, created sharded. `params` (e.g. loaded from HF) replace the random init."""
  shardings = state_shardings(cfg, tx, mesh)
  key = jax.random.PRNGKey(seed)
  init_key, state_key = jax.random.split(key)
  if params is None:
    params = init_params(cfg, init_key, shardings.params)
  return jax.jit(lambda p, k: _make(p, tx, k), in_shardings=(shardings.params, shardings.rng),
                 out_shardings=shardings)(params, state_key)


def tree_bytes_per_device(tree, device=None) -> int:
  """Bytes of `tree`'s arrays resident on one device (the first by default)."""
  device = device or jax.devices()[0]
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total
