"""Token-level losses over vocabulary-sized logits, computed in chunks of positions.

The vocabulary can be 128k-152k: no function here materialises more than one chunk of
[batch, chunk_len, V] float32 logits. The chunks run under `lax.map` with `jax.checkpoint`, so the
backward pass recomputes each chunk's logits instead of keeping them all.
Chunks split the sequence axis, never the batch axis, so a batch sharded over devices stays local.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _chunks(x: Array, c: int) -> Array:
  """[B, T, ...] (T a multiple of c) -> [T/c, B, c, ...]."""
  b, t = x.shape[:2]
  return x.reshape(b, t // c, c, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x: Array, t: int) -> Array:
  """[n, B, c] -> [B, t]."""
  n, b, c = x.shape
  return x.swapaxes(0, 1).reshape(b, n * c)[:, :t]


def token_logprobs(hidden: Array, kernel: Array, labels: Array, chunk_len: int = 256) -> Array:
  """log softmax(hidden @ kernel)[label] per position: [B, T] float32.

  hidden [B, T, E] (the model's final hidden states), kernel [E, V] (the lm_head), labels [B, T].
  """
  b, t, _ = hidden.shape
  c = max(1, min(chunk_len, t))
  pad = (-t) % c
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels = jnp.pad(labels, ((0, 0), (0, pad)))

  @jax.checkpoint
  def chunk_logprobs(args):
    h, y = args
    logits = jnp.einsum("bce,ev->bcv", h, kernel.astype(h.dtype),
                        preferred_element_type=jnp.float32)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
    picked = jnp.sum(jnp.where(vocab == y[..., None], logits, 0.0), axis=-1)
    return picked - jax.nn.logsumexp(logits, axis=-1)

  out = jax.lax.map(chunk_logprobs, (_chunks(hidden, c), _chunks(labels.astype(jnp.int32), c)))
  return _unchunk(out, t)


def masked_sum(x: Array, mask: Array) -> Array:
  return jnp.sum(x * mask.astype(x.dtype))


def nll(hidden: Array, kernel: Array, labels: Array, mask: Array, chunk_len: int = 256,
        normalizer: Array | None = None) -> Array:
  """Negative log-likelihood of `labels` averaged over positions where `mask` is set.

  `normalizer` (the token count to divide by) defaults to mask.sum(); pass the count of the whole
  global batch when this is one micro-batch of an accumulated step.
  """
  logp = token_logprobs(hidden, kernel, labels, chunk_len)
  count = jnp.sum(mask.astype(jnp.float32)) if normalizer is None else normalizer
  return -masked_sum(logp, mask) / jnp.maximum(count, 1.0)
