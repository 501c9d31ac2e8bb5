"""The optimizer (optax) from a `config.optim` block: Adam/AdamW, schedules, clipping, masks.

- Weight decay applies to matrices only (projections, lm_head, LoRA factors); norms, biases and
  (unless `decay_embedding`) the embedding are not decayed.
- With LoRA (`model.lora_rank > 0`) the optimizer only ever sees the adapters: the train state
  holds nothing else (proxykd/train/state.py), so the base weights have no optimizer state.
- Gradient accumulation is done inside the train step (proxykd/train/step.py), not here, so one
  optimizer update is one step.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import optax


NO_DECAY_LEAVES = ("scale", "bias")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adamw",  # adamw | adam
      lr=3e-4,
      schedule="warmup_cosine",  # constant | warmup_cosine
      warmup_steps=0,
      end_lr_ratio=0.1,  # warmup_cosine: final lr = lr * end_lr_ratio
      b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.0,
      decay_embedding=False,
      clip_norm=1.0,  # 0 disables clipping
  ))


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> Callable[[Any], Any]:
  if opt.schedule == "constant":
    if opt.warmup_steps:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, opt.lr, opt.warmup_steps), optax.constant_schedule(opt.lr)],
          [opt.warmup_steps])
    return optax.constant_schedule(opt.lr)
  if opt.schedule == "warmup_cosine":
    decay = max(total_steps, opt.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, opt.lr, opt.warmup_steps, decay,
                                              end_value=opt.lr * opt.end_lr_ratio)
  raise ValueError(f"config.optim.schedule={opt.schedule!r}: choose constant or warmup_cosine")


def _name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params, decay_embedding: bool = False):
  def decays(path, _):
    name = _name(path)
    if name in NO_DECAY_LEAVES:
      return False
    return decay_embedding or name != "embedding"
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int):
  """(optax transformation, lr schedule). The masks are computed from the params at init."""
  schedule = make_schedule(opt, total_steps)
  if opt.name == "adamw":
    base = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay,
                       mask=lambda p: decay_mask(p, opt.decay_embedding))
  elif opt.name == "adam":
    base = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  else:
    raise ValueError(f"config.optim.name={opt.name!r}: choose adamw or adam")
  parts = [optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm else []
  return optax.chain(*parts, base), schedule
