"""LoRA adapters: which parameters train, and merging adapters into the base kernels.

The adapters live in the model (proxykd/models/transformer.py `Projection`): a targeted projection
holds `kernel`, `lora_a` [*in, r] and `lora_b` [r, *out], and computes x·W + (alpha/r)·x·A·B.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from proxykd.models.config import ModelConfig


def is_lora(path) -> bool:
  """True for a LoRA adapter parameter, given a key path from `jax.tree_util`."""
  return any(getattr(k, "key", None) in ("lora_a", "lora_b") for k in path)


def trainable_mask(params, cfg: ModelConfig):
  """Pytree of bools: with LoRA only the adapters train; without it, everything."""
  if not cfg.lora_rank:
    return jax.tree.map(lambda _: True, params)
  return jax.tree_util.tree_map_with_path(lambda p, _: is_lora(p), params)


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
