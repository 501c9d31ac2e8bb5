"""The train state (step, trainable parameters, optimizer state, RNG: one pytree), its shardings,
and the frozen inputs of the step.

The state holds only what trains (proxykd/models/lora.py `split`): the whole model, or with LoRA the
adapters, whose base weights become the frozen input `frozen["base"]`. Other models a loss reads
(a DPO reference, a distillation proxy) are frozen inputs too, each sharded by the logical rules
for its own config.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from proxykd.models import lora
from proxykd.models.checkpoint import with_shardings  # noqa: F401  (re-exported for callers)
from proxykd.models.config import ModelConfig
from proxykd.models.transformer import abstract_params
from proxykd.train import sharding as shd


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer updates done so far.
  params: Any  # the trainable tree
  opt_state: Any
  rng: jax.Array  # uint32[2]; each step folds in its step number.


def _make(params, tx: optax.GradientTransformation, rng) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=rng)


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation) -> TrainState:
  trainable, _ = lora.split(abstract_params(cfg), cfg)
  return jax.eval_shape(lambda p: _make(p, tx, jax.random.PRNGKey(0)), trainable)


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
  """NamedShardings of every leaf: params by the logical rules, optimizer state like the params."""
  abstract = abstract_state(cfg, tx)
  param_sh, _ = lora.split(shd.param_shardings(cfg, mesh), cfg)
  rep = shd.replicated(mesh)
  return TrainState(step=rep, params=param_sh,
                    opt_state=shd.shardings_like(abstract.opt_state, abstract.params, param_sh, mesh),
                    rng=rep)


def base_spec(cfg: ModelConfig, mesh: Mesh) -> dict:
  """{"base": ShapeDtypeStructs with shardings} for a LoRA model's base weights; {} without LoRA."""
  if not cfg.lora_rank:
    return {}
  _, base_abs = lora.split(abstract_params(cfg), cfg)
  _, base_sh = lora.split(shd.param_shardings(cfg, mesh), cfg)
  return {lora.BASE: with_shardings(base_abs, base_sh)}


def model_spec(cfg: ModelConfig, mesh: Mesh) -> Any:
  """ShapeDtypeStructs (with shardings) of a frozen model's full parameters, e.g. a proxy."""
  return with_shardings(abstract_params(cfg), shd.param_shardings(cfg, mesh))


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, seed: int,
               params) -> tuple[TrainState, dict]:
  """(a fresh state, the frozen {"base": ...} or {}) from the model's full parameters, sharded
  (proxykd/models/checkpoint.py `load_params`). The trainable part is donated into the state, so
  loaded weights are never held twice."""
  shardings = state_shardings(cfg, tx, mesh)
  trainable, _ = lora.split(params, cfg)
  _, state_key = jax.random.split(jax.random.PRNGKey(seed))
  state = jax.jit(lambda p, k: _make(p, tx, k), in_shardings=(shardings.params, shardings.rng),
                  out_shardings=shardings, donate_argnums=(0,))(trainable, state_key)
  return state, init_base(cfg, params)


def init_base(cfg: ModelConfig, params) -> dict:
  """The frozen {"base": ...} of a LoRA model from its full parameters ({} without LoRA)."""
  return {lora.BASE: lora.split(params, cfg)[1]} if cfg.lora_rank else {}


def tree_bytes_per_device(tree, device=None) -> int:
  """Bytes of `tree`'s arrays resident on one device (the first by default)."""
  device = device or jax.devices()[0]
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total
