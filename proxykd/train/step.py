"""Pure train steps `step(state, batch, frozen) -> (state, metrics)` and the one place they are jitted.

- `state` (TrainState) holds only what trains: with LoRA the adapters, else the whole model.
- `batch`: a dict of named [B, T, ...] arrays, whatever the data pipeline's element spec holds
  (proxykd/data/packing.py: inputs, targets, positions, segment_ids, loss_mask, doc, offset, and any
  per-token features such as sample weights or sparse top-k targets).
- `frozen`: other models' parameters the loss reads but never trains, e.g. {"base": the LoRA base
  weights, "proxy": ..., "reference": ...}; sharded on the same mesh by the same logical rules, an
  explicit non-donated input of the compiled step (never a closure constant, never checkpointed).

A `Loss` returns the SUM of its per-unit losses over the (micro-)batch and metrics as (numerator,
denominator) pairs; it declares its normaliser (`normalizer(batch)`: response tokens for SFT/KD,
pairs for DPO), computed once on the global batch, so gradient accumulation over micro-batches
adds up to exactly the gradient of the global-batch mean and the metrics are sums over every
micro-batch, not the last one's. Metric names are namespaced (`sft/`, `dpo/`, `distill/`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from proxykd import losses
from proxykd.models.config import ModelConfig
from proxykd.models.transformer import Transformer, lm_head_kernel
from proxykd.train import sharding as shd
from proxykd.models.lora import BASE, combine
from proxykd.train.state import TrainState, with_shardings

Metrics = dict[str, tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Loss:
  """fn(params, frozen, batch, rng) -> (sum of the per-unit losses, {name: (num, den)});
  `params` are the trained model's full parameters (LoRA adapters combined with their base)."""
  fn: Callable[[Any, dict, dict, jax.Array], tuple[jax.Array, Metrics]]
  normalizer: Callable[[dict], jax.Array]


def token_count(batch: dict) -> jax.Array:
  return jnp.sum(batch["loss_mask"].astype(jnp.float32))


def sft_loss(cfg: ModelConfig, chunk_len: int = 256, prefix: str = "sft") -> Loss:
  """NLL of the response tokens, the lm_head applied chunk by chunk (losses.nll)."""
  model = Transformer(cfg)

  def fn(params, frozen, batch, rng):
    del frozen, rng  # SFT reads no other model and is deterministic.
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"],
                         batch["segment_ids"], return_hidden=True)
    total = losses.nll(hidden, lm_head_kernel(params, cfg), batch["targets"], batch["loss_mask"],
                       chunk_len, normalizer=jnp.ones((), jnp.float32))
    return total, {f"{prefix}/nll": (total, token_count(batch))}

  return Loss(fn, token_count)


def _micro_batches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...]: micro-batch j takes rows j, j+k, ... so each device's rows stay
  on that device (the batch axis is sharded in contiguous blocks)."""
  return jax.tree_util.tree_map(
      lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def _objective(loss: Loss):
  def objective(trainable, frozen, batch, rng, normalizer):
    total, metrics = loss.fn(combine(trainable, frozen.get(BASE)), frozen, batch, rng)
    return total / jnp.maximum(normalizer, 1.0), metrics
  return objective


def make_train_step(loss: Loss, tx: optax.GradientTransformation, schedule, *, grad_accum: int = 1):
  """The pure step. Gradients are taken with respect to `state.params` (the trainable tree) only."""
  grad_fn = jax.value_and_grad(_objective(loss), has_aux=True)

  def step(state: TrainState, batch: dict, frozen: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    normalizer = loss.normalizer(batch)
    if grad_accum == 1:
      (value, metrics), grads = grad_fn(state.params, frozen, batch, rng, normalizer)
    else:
      def body(carry, xs):
        micro, i = xs
        (v, m), g = grad_fn(state.params, frozen, micro, jax.random.fold_in(rng, i), normalizer)
        return jax.tree_util.tree_map(jnp.add, carry, (v, m, g)), None

      _, metrics0 = jax.eval_shape(_objective(loss), state.params, frozen, batch, rng, normalizer)
      zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                     (jnp.zeros((), jnp.float32), metrics0, state.params))
      (value, metrics, grads), _ = jax.lax.scan(
          body, zeros, (_micro_batches(batch, grad_accum), jnp.arange(grad_accum)))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {"loss": value, "grad_norm": optax.tree.norm(grads),
           "lr": jnp.asarray(schedule(state.step)), "tokens": token_count(batch),
           "batch_tokens": jnp.sum(batch["segment_ids"] > 0),
           **{k: num / jnp.maximum(den, 1e-9) for k, (num, den) in metrics.items()}}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

  return step


def make_eval_step(loss: Loss):
  """`eval(params, batch, frozen) -> (loss sum, normaliser, metric pairs)`: sums, so several
  batches combine exactly (proxykd/train/loop.py `evaluate`)."""

  def evaluate(params, batch, frozen):
    total, metrics = loss.fn(combine(params, frozen.get(BASE)), frozen, batch,
                             jax.random.PRNGKey(0))
    return total, loss.normalizer(batch), metrics

  return evaluate


def batch_spec(element_spec: dict, global_batch: int, mesh: Mesh) -> dict:
  """ShapeDtypeStructs of a global batch from the pipeline's element spec ({name: (row shape,
  dtype)}, proxykd/data/packing.py `Rows.element_spec`): rows over the mesh's batch axes."""
  return {k: jax.ShapeDtypeStruct((global_batch, *shape), dtype,
                                  sharding=shd.batch_sharding(mesh, 1 + len(shape)))
          for k, (shape, dtype) in element_spec.items()}


def _shardings(tree):
  return jax.tree_util.tree_map(lambda s: s.sharding, tree)


def compile_step(step, state_abstract: TrainState, state_sh: TrainState, batch: dict, frozen: dict,
                 mesh: Mesh):
  """Jit once, ahead of time, with explicit shardings and the state donated. `batch` and `frozen`
  are ShapeDtypeStructs carrying their shardings (frozen: see state.frozen_spec)."""
  jitted = jax.jit(step, in_shardings=(state_sh, _shardings(batch), _shardings(frozen)),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=(0,))
  with shd.mesh_context(mesh):
    return jitted.lower(with_shardings(state_abstract, state_sh), batch, frozen).compile()


def compile_eval(evaluate, params_abstract, params_sh, batch: dict, frozen: dict, mesh: Mesh):
  jitted = jax.jit(evaluate, in_shardings=(params_sh, _shardings(batch), _shardings(frozen)),
                   out_shardings=shd.replicated(mesh))
  with shd.mesh_context(mesh):
    return jitted.lower(with_shardings(params_abstract, params_sh), batch, frozen).compile()
