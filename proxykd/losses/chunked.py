"""Token-level losses over vocabulary-sized logits, computed in chunks of positions.

The vocabulary can be 128k-152k: no function here materialises more than one chunk of
[batch, chunk_len, V] float32 logits. The chunks run under `lax.map` with `jax.checkpoint`, so the
backward pass recomputes each chunk's logits instead of keeping them all; `nll` and `distill` (NLL
plus alpha w KL to a soft target, the student's loss) go further and compute their gradients during
the forward pass (a custom VJP), so nothing is recomputed.
Chunks split the sequence axis, never the batch axis, so a batch sharded over devices stays local.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from proxykd.losses import targets

Array = jax.Array


def _chunks(x: Array, c: int, axis: int = 1) -> Array:
  """Split `axis` (a multiple of c) into chunks of c, the chunk index moved to the front:
  [B, T, ...] -> [T/c, B, c, ...] for axis 1."""
  n = x.shape[axis] // c
  x = x.reshape(*x.shape[:axis], n, c, *x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _unchunk(x: Array, t: int) -> Array:
  """[n, B, c] -> [B, t]."""
  n, b, c = x.shape
  return x.swapaxes(0, 1).reshape(b, n * c)[:, :t]


def _pad_to(x: Array, t: int) -> Array:
  pad = t - x.shape[1]
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x


def _chunk_logits(h: Array, kernel: Array, y: Array):
  """One chunk: float32 logits [..., c, V], their logsumexp, the one-hot of `y`, and the picked
  logit per position."""
  logits = jnp.einsum("...e,ev->...v", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
  target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == y[..., None]
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


def target_stats(hidden: Array, kernel: Array, labels: Array, chunk_len: int = 256
                 ) -> tuple[Array, Array]:
  """For scoring (no gradient): (log p(label) [B, T] float32, label is the argmax [B, T] bool)."""
  t = hidden.shape[1]
  c = max(1, min(chunk_len, t))
  padded = -(-t // c) * c
  hidden, labels = _pad_to(hidden, padded), _pad_to(labels, padded)

  def chunk(args):
    h, y = args
    logits, lse, _, picked = _chunk_logits(h, kernel, y)
    return picked - lse, jnp.argmax(logits, axis=-1) == y

  logp, top1 = jax.lax.map(chunk, (_chunks(hidden, c), _chunks(labels.astype(jnp.int32), c)))
  return _unchunk(logp, t), _unchunk(top1, t)


def topk_logprobs(hidden: Array, kernel: Array, k: int, chunk_len: int = 256, tau: float = 1.0
                  ) -> tuple[Array, Array, Array]:
  """The k most likely tokens of softmax(hidden @ kernel / tau) per position, for an offline cache:
  (ids [B, T, k] int32, their log-probs [B, T, k], the log of the mass of all other tokens [B, T])."""
  t = hidden.shape[1]
  c = max(1, min(chunk_len, t))
  padded = -(-t // c) * c
  hidden = _pad_to(hidden, padded)

  def chunk(h):
    logits = jnp.einsum("...e,ev->...v", h, kernel.astype(h.dtype),
                        preferred_element_type=jnp.float32) / tau
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_id = jax.lax.top_k(logp, k)
    covered = jnp.minimum(jnp.sum(jnp.exp(top_lp), axis=-1), 1.0)
    return top_id.astype(jnp.int32), top_lp, jnp.log1p(-covered)  # -inf when nothing is left

  ids, lp, tail = jax.lax.map(chunk, _chunks(hidden, c))
  unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :t]
  return unchunk(ids), unchunk(lp), unchunk(tail)


def batch_shards() -> int:
  """How many devices the batch axis is split over in the current mesh (1 outside a mesh).

  Resolved through the logical axis `activation_batch` (proxykd/train/sharding.py's rules), so
  this layer needs no mesh axis names.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  axes = nn.logical_to_mesh_axes(("activation_batch",))[0] or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def _constrain(x: Array, *logical) -> Array:
  return nn.with_logical_constraint(x, logical) if not jax.sharding.get_abstract_mesh().empty else x


def _chunked(hidden, labels, mask, weight, per_position, c):
  """The per-position inputs of the distillation sums, split into chunks of c positions."""
  split = lambda x: _chunks(x, c)
  return (split(hidden), split(labels.astype(jnp.int32)), split(mask),
          split(weight.astype(jnp.float32)), jax.tree.map(split, per_position))


def _sums(per_chunk: tuple[Array, Array], alpha: float):
  """(total, (nll_sum, kd_sum)) from the chunks' (nll, kd) sums."""
  nll_sum, kl_sum = jnp.sum(per_chunk[0]), jnp.sum(per_chunk[1])
  return nll_sum + alpha * kl_sum, (nll_sum, kl_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _fused_sum(hidden, kernel, labels, mask, weight, per_position, shared, c, target_fn, alpha):
  """(sum m (NLL + alpha w KL(p̂ || q)), (sum m NLL, sum m w KL)); T a multiple of c.

  p̂ = target_fn(the chunk of `per_position`, `shared`) per chunk (proxykd/losses/targets.py); no
  target (target_fn None) is the plain NLL. Differentiable in hidden and kernel only. Undifferentiated
  (evaluation), the chunks compute the sums alone.
  """
  def chunk(args):
    h, y, m, w, pp = args
    logits, lse, _, picked = _chunk_logits(h, kernel, y)
    m = m.astype(jnp.float32)
    kl = jnp.zeros_like(lse)
    if target_fn is not None:
      kl, _ = targets.forward_kl_parts(target_fn(pp, shared), logits - lse[..., None])
    return jnp.sum((lse - picked) * m), jnp.sum(kl * w * m)

  return _sums(jax.lax.map(chunk, _chunked(hidden, labels, mask, weight, per_position, c)), alpha)


def _fused_sum_fwd(hidden, kernel, labels, mask, weight, per_position, shared, c, target_fn, alpha):
  """The value and both gradients in one pass over the chunks (no logits recomputed later).

  d/dlogits [NLL + alpha w KL(p̂ || softmax)] = (q - onehot(y)) + alpha w (q - p̃) (targets.py), so
  the forward pass has everything the backward needs. The lm_head gradient sums over every token
  of the batch, which is split over devices: summing into one [E, V] accumulator would all-reduce
  it across the batch devices once per CHUNK. The accumulator instead has a leading axis of one
  slot per batch shard (sharded like the batch), so each device adds only its own tokens'
  contribution, and the slots are summed once, after the loop: one reduction per step.
  """
  b, t, e = hidden.shape
  d = batch_shards() if b % batch_shards() == 0 else 1
  shard = lambda x: _constrain(x.reshape(d, b // d, *x.shape[1:]), "activation_batch",
                               *([None] * x.ndim))
  split = lambda x: _chunks(shard(x), c, axis=2)

  def chunk(dkernel, args):
    h, y, m, w, pp = args  # [d, b/d, c, ...]
    logits, lse, onehot, picked = _chunk_logits(h, kernel, y)
    m = m.astype(jnp.float32)
    q = jnp.exp(logits - lse[..., None])
    dlogits = (q - onehot) * m[..., None]  # d(-log p)/d logits
    kl = jnp.zeros_like(lse)
    if target_fn is not None:
      kl, dkl = targets.forward_kl_parts(target_fn(pp, shared), logits - lse[..., None])
      aw = (alpha * w * m).astype(jnp.float32)
      dlogits = dlogits + aw[..., None] * dkl
      kl = kl * w * m
    dh = jnp.einsum("dbcv,ev->dbce", dlogits.astype(h.dtype), kernel.astype(h.dtype),
                    preferred_element_type=jnp.float32).astype(hidden.dtype)
    dkernel = dkernel + _constrain(
        jnp.einsum("dbce,dbcv->dev", h, dlogits.astype(h.dtype),
                   preferred_element_type=jnp.float32), "activation_batch", None, "vocab")
    return dkernel, (jnp.sum((lse - picked) * m), jnp.sum(kl), dh)

  partial = _constrain(jnp.zeros((d, *kernel.shape), jnp.float32), "activation_batch", None, "vocab")
  dkernel, (nll_sums, kl_sums, dh) = jax.lax.scan(
      chunk, partial, (split(hidden), split(labels.astype(jnp.int32)), split(mask),
                       split(weight.astype(jnp.float32)), jax.tree.map(split, per_position)))
  dh = jnp.moveaxis(dh, 0, 2).reshape(b, t, e)
  nll_sum, kl_sum = jnp.sum(nll_sums), jnp.sum(kl_sums)
  out = (nll_sum + alpha * kl_sum, (nll_sum, kl_sum))
  return out, (dh, jnp.sum(dkernel, axis=0).astype(kernel.dtype))


def _fused_sum_bwd(c, target_fn, alpha, residuals, g):
  del c, target_fn, alpha
  dh, dkernel = residuals
  g_total = g[0]  # The aux sums carry no gradient (callers stop it).
  return ((g_total * dh).astype(dh.dtype), (g_total * dkernel).astype(dkernel.dtype), None, None,
          None, None, None)


_fused_sum.defvjp(_fused_sum_fwd, _fused_sum_bwd)


def _autodiff_sum(hidden, kernel, labels, mask, weight, per_position, shared, c, target_fn, alpha,
                  div):
  """The same sums for any divergence `div` (proxykd/losses/divergences.py), differentiated by JAX
  chunk by chunk (each chunk's logits recomputed in the backward pass)."""
  @jax.checkpoint
  def chunk(args):
    h, y, m, w, pp = args
    logits, lse, _, picked = _chunk_logits(h, kernel, y)
    m = m.astype(jnp.float32)
    logp, logq = targets.aligned(target_fn(pp, shared), logits - lse[..., None])
    dv = div(jax.lax.stop_gradient(logp), logq, m) * w
    return jnp.sum((lse - picked) * m), jnp.sum(dv)

  return _sums(jax.lax.map(chunk, _chunked(hidden, labels, mask, weight, per_position, c)), alpha)


def distill(hidden: Array, kernel: Array, labels: Array, mask: Array, *, weight: Array | None = None,
            per_position=None, shared=None, target_fn=None, alpha: float = 0.0,
            divergence_fn=None, chunk_len: int = 256):
  """Chunked distillation sums: (total, nll_sum, kd_sum), total = nll_sum + alpha * kd_sum,
  nll_sum = sum over masked positions of -log q(label), kd_sum = sum of w * D(p̂ || q).

  hidden [B, T, E] and kernel [E, V]: the student's final hidden states and lm_head; labels, mask,
  weight [B, T] (weight: the per-token sample weight w, default 1); per_position: a pytree of
  [B, T, ...] arrays split into chunks with the positions, and `shared` arrays passed whole, to
  `target_fn(chunk of per_position, shared) -> DenseTarget | SparseTarget` (p̂ of the chunk, e.g.
  the posterior from the proxy's hidden states and lm_head). No chunk holds more than [B, c, V].

  Forward KL (divergence_fn None) computes its gradients in the forward pass (a custom VJP, no
  logits recomputed); any other divergence is differentiated by JAX with each chunk recomputed.
  With alpha == 0 or no target_fn this is exactly the NLL of `nll`.
  """
  b, t, _ = hidden.shape
  c = max(1, min(chunk_len, t))
  padded = -(-t // c) * c
  pad = lambda x: _pad_to(x, padded)
  weight = jnp.ones(mask.shape, jnp.float32) if weight is None else weight
  per_position = {} if per_position is None else per_position
  shared = {} if shared is None else shared
  target_fn = target_fn if alpha else None
  args = (pad(hidden), kernel, pad(labels), pad(mask), pad(weight), jax.tree.map(pad, per_position),
          shared)
  if target_fn is None or divergence_fn is None:
    total, (nll_sum, kd_sum) = _fused_sum(*args, c, target_fn, float(alpha))
  else:
    total, (nll_sum, kd_sum) = _autodiff_sum(*args, c, target_fn, float(alpha), divergence_fn)
  return total, jax.lax.stop_gradient(nll_sum), jax.lax.stop_gradient(kd_sum)


def nll(hidden: Array, kernel: Array, labels: Array, mask: Array, chunk_len: int = 256,
        normalizer: Array | None = None) -> Array:
  """Negative log-likelihood of `labels` averaged over positions where `mask` is set.

  Under differentiation the forward computes the gradients too, chunk by chunk (as Liger-Kernel and
  Cut Cross-Entropy do), so no chunk's logits are recomputed and none is kept for the backward.
  `normalizer` (the token count to divide by) defaults to mask.sum(); pass the count of the whole
  global batch when this is one micro-batch of an accumulated step.
  """
  total, _, _ = distill(hidden, kernel, labels, mask, chunk_len=chunk_len)
  count = jnp.sum(mask.astype(jnp.float32)) if normalizer is None else normalizer
  return total / jnp.maximum(count, 1.0)
