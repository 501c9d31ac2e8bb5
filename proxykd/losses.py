"""Token-level losses over vocabulary-sized logits, computed in chunks of positions.

The vocabulary can be 128k-152k: no function here materialises more than one chunk of
[batch, chunk_len, V] float32 logits. The chunks run under `lax.map` with `jax.checkpoint`, so the
backward pass recomputes each chunk's logits instead of keeping them all; `nll` goes further and
computes its gradients during the forward pass (a custom VJP), so nothing is recomputed.
Chunks split the sequence axis, never the batch axis, so a batch sharded over devices stays local.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _nll_sum(hidden: Array, kernel: Array, labels: Array, mask: Array, c: int) -> Array:
  """sum(-log p(label) * mask); T a multiple of c. Differentiable in hidden and kernel."""
  logp = token_logprobs(hidden, kernel, labels, c)
  return -jnp.sum(logp * mask.astype(jnp.float32))


def _nll_sum_fwd(hidden, kernel, labels, mask, c):
  """The value and both gradients in one pass over the chunks (no logits recomputed later).

  The lm_head gradient sums over every token of the batch, which is split over devices: summing
  into one [E, V] accumulator would all-reduce it across the batch devices once per CHUNK. The
  accumulator instead has a leading axis of one slot per batch shard (sharded like the batch), so
  each device adds only its own tokens' contribution, and the slots are summed once, after the
  loop: one reduction of the [E, V] gradient per step.
  """
  b, t, e = hidden.shape
  d = batch_shards() if b % batch_shards() == 0 else 1
  shard = lambda x: _constrain(x.reshape(d, b // d, *x.shape[1:]), "activation_batch",
                               *([None] * x.ndim))

  def chunk(dkernel, args):
    h, y, m = args  # [d, b/d, c, ...]
    logits, lse, target, picked = _chunk_logits(h, kernel, y)
    m = m.astype(jnp.float32)
    dlogits = (jnp.exp(logits - lse[..., None]) - target) * m[..., None]  # d(-log p)/d logits
    dh = jnp.einsum("dbcv,ev->dbce", dlogits.astype(h.dtype), kernel.astype(h.dtype),
                    preferred_element_type=jnp.float32).astype(hidden.dtype)
    dkernel = dkernel + _constrain(
        jnp.einsum("dbce,dbcv->dev", h, dlogits.astype(h.dtype),
                   preferred_element_type=jnp.float32), "activation_batch", None, "vocab")
    return dkernel, (jnp.sum((lse - picked) * m), dh)

  partial = _constrain(jnp.zeros((d, *kernel.shape), jnp.float32), "activation_batch", None, "vocab")
  dkernel, (sums, dh) = jax.lax.scan(
      chunk, partial, (_chunks(shard(hidden), c, axis=2), _chunks(shard(labels.astype(jnp.int32)), c, axis=2),
                       _chunks(shard(mask), c, axis=2)))
  dh = jnp.moveaxis(dh, 0, 2).reshape(b, t, e)
  return jnp.sum(sums), (dh, jnp.sum(dkernel, axis=0).astype(kernel.dtype))


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


# ----------------------------------------------------------------------------- preference losses
# One function per loss, same signature (TRL's names): the per-pair loss from the log-ratios
# log pi(y|x) - log pi_ref(y|x) of the chosen and the rejected response, summed over their tokens.


def sigmoid_preference(chosen_logratio: Array, rejected_logratio: Array, beta: float) -> Array:
  """DPO (Rafailov et al. 2023): -log sigmoid(beta * (chosen - rejected))."""
  return -jax.nn.log_sigmoid(beta * (chosen_logratio - rejected_logratio))


def ipo_preference(chosen_logratio: Array, rejected_logratio: Array, beta: float) -> Array:
  """IPO (Azar et al. 2023): (chosen - rejected - 1 / (2 beta))^2."""
  return (chosen_logratio - rejected_logratio - 1.0 / (2.0 * beta)) ** 2


def hinge_preference(chosen_logratio: Array, rejected_logratio: Array, beta: float) -> Array:
  """SLiC (Zhao et al. 2023): max(0, 1 - beta * (chosen - rejected))."""
  return jax.nn.relu(1.0 - beta * (chosen_logratio - rejected_logratio))


PREFERENCE_LOSSES = {"sigmoid": sigmoid_preference, "ipo": ipo_preference,
                     "hinge": hinge_preference}


def preference_loss(name: str):
  if name not in PREFERENCE_LOSSES:
    raise ValueError(f"config.dpo.loss={name!r}: choose one of {sorted(PREFERENCE_LOSSES)}")
  return PREFERENCE_LOSSES[name]


# ----------------------------------------------------------------------------- divergences
# One function per divergence D(p || q), same signature (DistiLLM's family): log-probabilities of
# the target p and the student q over the same last axis (the vocabulary, or sparse buckets),
# and a mask; returns the per-position divergence times the mask. 0 * log 0 counts as 0.


def _plogp_ratio(logp: Array, logq: Array) -> Array:
  """p * (log p - log q), 0 where p = 0."""
  p = jnp.exp(logp)
  return jnp.where(p > 0, p * (logp - logq), 0.0)


def _log_mix(logp: Array, logq: Array, w: float) -> Array:
  """log(w p + (1 - w) q)."""
  return jnp.logaddexp(logp + jnp.log(w), logq + jnp.log1p(-w)) if 0 < w < 1 else (
      logp if w >= 1 else logq)


def forward_kl(logp: Array, logq: Array, mask: Array) -> Array:
  """KL(p || q) = sum p (log p - log q): mode-covering (METHOD.md's default)."""
  return jnp.sum(_plogp_ratio(logp, logq), axis=-1) * mask


def reverse_kl(logp: Array, logq: Array, mask: Array) -> Array:
  """KL(q || p): mode-seeking."""
  return jnp.sum(_plogp_ratio(logq, logp), axis=-1) * mask


def jsd(logp: Array, logq: Array, mask: Array, beta: float = 0.5) -> Array:
  """Generalised Jensen-Shannon: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1-beta) q."""
  logm = _log_mix(logp, logq, beta)
  return (beta * jnp.sum(_plogp_ratio(logp, logm), -1)
          + (1 - beta) * jnp.sum(_plogp_ratio(logq, logm), -1)) * mask


def skew_kl(logp: Array, logq: Array, mask: Array, lam: float = 0.1) -> Array:
  """Skew KL (DistiLLM): KL(p || lam p + (1 - lam) q)."""
  return jnp.sum(_plogp_ratio(logp, _log_mix(logp, logq, lam)), axis=-1) * mask


def tvd(logp: Array, logq: Array, mask: Array) -> Array:
  """Total variation: 1/2 sum |p - q|."""
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - jnp.exp(logq)), axis=-1) * mask


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl,
               "tvd": tvd}


def divergence(name: str, param: float | None = None):
  """The divergence by name; `param` is JSD's beta or skew KL's lambda."""
  if name not in DIVERGENCES:
    raise ValueError(f"config.kd.divergence={name!r}: choose one of {sorted(DIVERGENCES)}")
  fn = DIVERGENCES[name]
  if param is not None and name in ("jsd", "skew_kl"):
    return functools.partial(fn, **{"beta" if name == "jsd" else "lam": param})
  return fn
