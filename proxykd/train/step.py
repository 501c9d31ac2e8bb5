"""Pure train steps `step(state, batch) -> (state, metrics)` and the one place they are jitted.

A batch is a dict of [B, T] arrays (see proxykd/data/pipeline.py): `inputs`, `targets`,
`positions`, `segment_ids` (0 = padding) and `loss_mask` (1 where the target is a response token).
A loss function `loss_fn(params, batch, rng, normalizer) -> (loss, aux)` returns its share of the
global-batch loss (its sum divided by `normalizer`, the global count of loss tokens), so gradient
accumulation over micro-batches adds up to exactly the gradient of the global-batch mean.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from proxykd import losses
from proxykd.models.config import ModelConfig
from proxykd.models.transformer import Transformer, lm_head_kernel
from proxykd.train import sharding as shd
from proxykd.train.lora import trainable_mask
from proxykd.train.state import TrainState, with_shardings

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
LossFn = Callable[[Any, dict, jax.Array, jax.Array], tuple[jax.Array, dict]]


def sft_loss(cfg: ModelConfig, chunk_len: int = 256) -> LossFn:
  """NLL of the response tokens, the lm_head applied chunk by chunk (losses.nll)."""
  model = Transformer(cfg)

  def loss_fn(params, batch, rng, normalizer):
    del rng  # SFT is deterministic; the argument serves losses that sample.
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"],
                         batch["segment_ids"], return_hidden=True)
    loss = losses.nll(hidden, lm_head_kernel(params, cfg), batch["targets"], batch["loss_mask"],
                      chunk_len, normalizer)
    return loss, {}

  return loss_fn


def _micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...]: micro-batch j takes rows j, j+k, ... so each device's rows stay
  on that device (the batch axis is sharded in contiguous blocks)."""
  return jax.tree_util.tree_map(
      lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, schedule, *,
                    grad_accum: int = 1, trainable=None):
  """The pure step. `trainable`: a bool pytree like the params (None: all trained); frozen
  parameters get no gradient computed and are left untouched."""

  def loss_of(params, batch, rng, normalizer):
    if trainable is not None:
      params = jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p),
                                      params, trainable)
    return loss_fn(params, batch, rng, normalizer)

  grad_fn = jax.value_and_grad(loss_of, has_aux=True)

  def step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    mask = batch["loss_mask"].astype(jnp.float32)
    count = jnp.sum(mask)
    if grad_accum == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng, count)
    else:
      def body(carry, xs):
        micro, i = xs
        (l, a), g = grad_fn(state.params, micro, jax.random.fold_in(rng, i), count)
        loss_sum, grad_sum, _ = carry
        return (loss_sum + l, jax.tree_util.tree_map(jnp.add, grad_sum, g), a), None

      zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
      _, aux0 = jax.eval_shape(loss_of, state.params, batch, rng, count)
      aux_init = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
      (loss, grads, aux), _ = jax.lax.scan(
          body, (jnp.zeros((), jnp.float32), zeros, aux_init),
          (_micro_batches(batch, grad_accum), jnp.arange(grad_accum)))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if trainable is None:
      params = optax.apply_updates(state.params, updates)
    else:
      params = jax.tree_util.tree_map(lambda p, u, t: p + u.astype(p.dtype) if t else p,
                                      state.params, updates, trainable)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state.step)),
               "tokens": count, "batch_tokens": jnp.sum(batch["segment_ids"] > 0), **aux}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def make_eval_step(loss_fn: LossFn):
  """`eval(params, batch) -> (loss sum, token count)`: sums, so several batches combine exactly."""

  def evaluate(params, batch):
    count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    loss, _ = loss_fn(params, batch, jax.random.PRNGKey(0), jnp.ones((), jnp.float32))
    return loss, count

  return evaluate


def batch_spec(global_batch: int, seq_len: int, mesh: Mesh) -> dict:
  sh = shd.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=sh)
          for k in BATCH_KEYS}


def compile_step(step, state_abstract: TrainState, state_sh: TrainState, batch: dict, mesh: Mesh):
  """Jit once, ahead of time, with explicit shardings and the state donated."""
  batch_sh = jax.tree_util.tree_map(lambda s: s.sharding, batch)
  jitted = jax.jit(step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=(0,))
  with shd.mesh_context(mesh):
    return jitted.lower(with_shardings(state_abstract, state_sh), batch).compile()


def compile_eval(evaluate, params_abstract, params_sh, batch: dict, mesh: Mesh):
  batch_sh = jax.tree_util.tree_map(lambda s: s.sharding, batch)
  jitted = jax.jit(evaluate, in_shardings=(params_sh, batch_sh),
                   out_shardings=shd.replicated(mesh))
  with shd.mesh_context(mesh):
    return jitted.lower(with_shardings(params_abstract, params_sh), batch).compile()


def trainable_for(cfg: ModelConfig, params) -> Any:
  """The trainable mask for `cfg`: None (all) without LoRA, only adapters with it."""
  return trainable_mask(params, cfg) if cfg.lora_rank > 0 else None
