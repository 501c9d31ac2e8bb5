"""LoRA adapters: which parameters train, splitting and combining parameter trees, merging.

The adapters live in the model (proxykd/models/transformer.py `Projection`): a targeted projection
holds `kernel`, `lora_a` [*in, r] and `lora_b` [r, *out], and computes x·W + (alpha/r)·x·A·B.

A LoRA run trains only the adapters: its train state holds the adapter tree, and the base weights
travel to the step as the frozen input `frozen[BASE]` (proxykd/train/step.py), so they get no
gradient, no optimizer state and no place in the run's checkpoints (which record where the base
came from instead: see proxykd/models/checkpoint.py).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from proxykd.models.config import ModelConfig
from proxykd.models.transformer import init_params

BASE = "base"  # frozen[BASE]: the base weights a LoRA run's adapters sit on.


def is_lora(path) -> bool:
  """True for a LoRA adapter parameter, given a key path from `jax.tree_util`."""
  return any(getattr(k, "key", None) in ("lora_a", "lora_b") for k in path)


def trainable_mask(params, cfg: ModelConfig):
  """Pytree of bools: with LoRA only the adapters train; without it, everything."""
  if not cfg.lora_rank:
    return jax.tree.map(lambda _: True, params)
  return jax.tree_util.tree_map_with_path(lambda p, _: is_lora(p), params)


def _select(tree: dict, keep) -> dict:
  """The sub-dict of `tree` whose leaves satisfy keep(path); empty branches left out."""
  def visit(node, path):
    if not isinstance(node, dict):
      return node if keep(path) else None
    out = {}
    for k, v in node.items():
      sub = visit(v, path + (jax.tree_util.DictKey(k),))
      if sub is not None and not (isinstance(sub, dict) and not sub):
        out[k] = sub
    return out
  return visit(tree, ())


def split(params: dict, cfg: ModelConfig) -> tuple[dict, dict | None]:
  """(trainable, base): with LoRA (adapters, everything else); without it (params, None)."""
  if not cfg.lora_rank:
    return params, None
  return _select(params, is_lora), _select(params, lambda p: not is_lora(p))


def combine(trainable: dict, base: dict | None) -> dict:
  """The inverse of `split`: one parameter tree (a deep merge; `base` may be None)."""
  if base is None:
    return trainable
  out = dict(base)
  for k, v in trainable.items():
    out[k] = combine(v, base.get(k)) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
  return out


def merge(params, cfg: ModelConfig):
  """Fold every adapter into its kernel: W += (alpha/r)·A·B. -> (plain params, cfg without LoRA)."""
  scale = cfg.lora_alpha / cfg.lora_rank

  def visit(tree):
    if not isinstance(tree, dict):
      return tree
    if "lora_a" in tree:
      merged = _merge_kernel(tree["kernel"], tree["lora_a"], tree["lora_b"], scale)
      return {k: (merged if k == "kernel" else v) for k, v in tree.items() if k not in ("lora_a", "lora_b")}
    return {k: visit(v) for k, v in tree.items()}

  return visit(params), cfg.replace(lora_rank=0)


def _merge_kernel(w, a, b, scale):
  """w: [L, *in, *out], a: [L, *in, r], b: [L, r, *out] (L = stacked layers)."""
  layers, r = a.shape[0], a.shape[-1]
  in_shape, out_shape = a.shape[1:-1], b.shape[2:]
  a2 = a.reshape(layers, -1, r).astype(jnp.float32)
  b2 = b.reshape(layers, r, -1).astype(jnp.float32)
  delta = jnp.einsum("lir,lro->lio", a2, b2).reshape((layers,) + in_shape + out_shape)
  return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def adapters_of(tree: Any) -> dict:
  """Only the adapter leaves of a parameter tree (arrays, ShapeDtypeStructs or shardings)."""
  return _select(tree, is_lora)


def fresh_adapters(cfg: ModelConfig, shardings=None, seed: int = 0):
  """Only the LoRA adapters of our init (lora_b = 0: the model is unchanged), computed without
  the base weights: the jitted init returns the adapters alone, so XLA never materialises the rest
  of the model (a 70B base loaded from disk is not initialised a second time)."""
  return init_params(cfg, jax.random.PRNGKey(seed), shardings, select=adapters_of)
