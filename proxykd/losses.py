"""Token-level losses over vocabulary-sized logits, computed in chunks of positions.

The vocabulary can be 128k-152k: no function here materialises more than one chunk of
[batch, chunk_len, V] float32 logits. The chunks run under `lax.map` with `jax.checkpoint`, so the
backward pass recomputes each chunk's logits instead of keeping them all; `nll` goes further and
computes its gradients during the forward pass (a custom VJP), so nothing is recomputed.
Chunks split the sequence axis, never the batch axis, so a batch sharded over devices stays local.
"""
from __future__ import annotations

import functools

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


def _pad_to(x: Array, t: int) -> Array:
  pad = t - x.shape[1]
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _chunk_logits(h: Array, kernel: Array, y: Array):
  """One chunk: float32 logits [B, c, V], their logsumexp, the one-hot of `y`, and the picked
  logit per position."""
  logits = jnp.einsum("bce,ev->bcv", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
  target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == y[..., None]
  picked = jnp.sum(jnp.where(target, logits, 0.0), axis=-1)
  return logits, jax.nn.logsumexp(logits, axis=-1), target, picked


def token_logprobs(hidden: Array, kernel: Array, labels: Array, chunk_len: int = 256) -> Array:
  """log softmax(hidden @ kernel)[label] per position: [B, T] float32.

  hidden [B, T, E] (the model's final hidden states), kernel [E, V] (the lm_head), labels [B, T].
  """
  t = hidden.shape[1]
  c = max(1, min(chunk_len, t))
  padded = -(-t // c) * c
  hidden, labels = _pad_to(hidden, padded), _pad_to(labels, padded)

  @jax.checkpoint
  def chunk_logprobs(args):
    h, y = args
    _, lse, _, picked = _chunk_logits(h, kernel, y)
    return picked - lse

  out = jax.lax.map(chunk_logprobs, (_chunks(hidden, c), _chunks(labels.astype(jnp.int32), c)))
  return _unchunk(out, t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nll_sum(hidden: Array, kernel: Array, labels: Array, mask: Array, c: int) -> Array:
  """sum(-log p(label) * mask); T a multiple of c. Differentiable in hidden and kernel."""
  logp = token_logprobs(hidden, kernel, labels, c)
  return -jnp.sum(logp * mask.astype(jnp.float32))


def _nll_sum_fwd(hidden, kernel, labels, mask, c):
  """The value and both gradients in one pass over the chunks (no logits recomputed later)."""
  b, t, _ = hidden.shape

  def chunk(dkernel, args):
    h, y, m = args
    logits, lse, target, picked = _chunk_logits(h, kernel, y)
    m = m.astype(jnp.float32)
    dlogits = (jnp.exp(logits - lse[..., None]) - target) * m[..., None]  # d(-log p)/d logits
    dh = jnp.einsum("bcv,ev->bce", dlogits.astype(h.dtype), kernel.astype(h.dtype),
                    preferred_element_type=jnp.float32).astype(hidden.dtype)
    dkernel = dkernel + jnp.einsum("bce,bcv->ev", h, dlogits.astype(h.dtype),
                                   preferred_element_type=jnp.float32)
    return dkernel, (jnp.sum((lse - picked) * m), dh)

  dkernel, (sums, dh) = jax.lax.scan(
      chunk, jnp.zeros(kernel.shape, jnp.float32),
      (_chunks(hidden, c), _chunks(labels.astype(jnp.int32), c), _chunks(mask, c)))
  n = t // c
  dh = dh.swapaxes(0, 1).reshape(b, n * c, -1)
  return jnp.sum(sums), (dh, dkernel.astype(kernel.dtype))


def _nll_sum_bwd(c, residuals, g):
  del c
  dh, dkernel = residuals
  return (g * dh).astype(dh.dtype), (g * dkernel).astype(dkernel.dtype), None, None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def nll(hidden: Array, kernel: Array, labels: Array, mask: Array, chunk_len: int = 256,
        normalizer: Array | None = None) -> Array:
  """Negative log-likelihood of `labels` averaged over positions where `mask` is set.

  Under differentiation the forward computes the gradients too, chunk by chunk (as Liger-Kernel and
  Cut Cross-Entropy do), so no chunk's logits are recomputed and none is kept for the backward.
  `normalizer` (the token count to divide by) defaults to mask.sum(); pass the count of the whole
  global batch when this is one micro-batch of an accumulated step.
  """
  b, t, _ = hidden.shape
  c = max(1, min(chunk_len, t))
  padded = -(-t // c) * c
  total = _nll_sum(_pad_to(hidden, padded), kernel, _pad_to(labels, padded),
                   _pad_to(mask, padded), c)
  count = jnp.sum(mask.astype(jnp.float32)) if normalizer is None else normalizer
  return total / jnp.maximum(count, 1.0)
