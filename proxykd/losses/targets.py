"""Soft targets of distillation for one chunk of positions, and the student's view of them.

A target is the estimated teacher distribution p̂ at each position of a chunk:
- `DenseTarget(logp)`: log p̂ over the whole vocabulary [..., V] (online mode: from the proxy's
  logits inside the step; white-box: the teacher's own distribution);
- `SparseTarget(ids, logp, tail)`: p̂ on a support of S distinct ids per position (padding: logp =
  -inf) and `tail` = log of the mass of every other token, one bucket (offline mode: the proxy
  cache's top-k joined with the prior's top-K and the label).
Against a sparse target the student is bucketed the same way, its tail bucket holding its mass
outside the support; with S = V this equals the dense case.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

Array = jax.Array


class DenseTarget(NamedTuple):
  logp: Array  # [..., V]


class SparseTarget(NamedTuple):
  ids: Array  # [..., S] int32, distinct per position
  logp: Array  # [..., S], -inf on padding slots
  tail: Array  # [...], log of the mass outside `ids` (-inf: none)


Target = Union[DenseTarget, SparseTarget]
_LOG_TINY = -69.0  # log(1e-30)


def _log1mexp(x: Array) -> Array:
  """log(1 - exp(x)) for x <= 0, stable."""
  return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def aligned(target: Target, student_logq: Array) -> tuple[Array, Array]:
  """(log p̂, log q) over a common last axis: the vocabulary for a dense target, the support plus
  one tail bucket for a sparse one. `student_logq` [..., V] = log_softmax of the student."""
  if isinstance(target, DenseTarget):
    return target.logp, student_logq
  valid = jnp.isfinite(target.logp)
  q_support = jnp.where(valid, jnp.take_along_axis(student_logq, target.ids, axis=-1), -jnp.inf)
  covered = jax.nn.logsumexp(q_support, axis=-1)
  # Floored: a support that covers (nearly) every token leaves the student no tail, while float
  # rounding can leave the target ~1e-7 of one; the floor keeps that term finite and negligible.
  q_tail = jnp.maximum(_log1mexp(jnp.minimum(covered, 0.0)), _LOG_TINY)
  return (jnp.concatenate([target.logp, target.tail[..., None]], axis=-1),
          jnp.concatenate([q_support, q_tail[..., None]], axis=-1))


def forward_kl_parts(target: Target, student_logq: Array) -> tuple[Array, Array]:
  """(KL(p̂ || q) per position, its gradient with respect to the student's logits).

  Dense: q - p̂. Sparse: q - p̃, where p̃ = p̂ on the support and the tail mass shared out over the
  other tokens in proportion to the student's own probabilities (the derivative of the bucketed
  KL). Neither needs more than this chunk's [..., V].
  """
  q = jnp.exp(student_logq)
  logp, logq = aligned(target, student_logq)
  p = jnp.exp(logp)
  kl = jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)
  if isinstance(target, DenseTarget):
    return kl, q - jnp.exp(target.logp)
  # p~ = (tail mass / student's tail mass) * q off the support; p̂ on it (as a scatter-add of the
  # differences, so padding slots, whose difference is 0, may repeat any id).
  ratio = jnp.where(jnp.isfinite(target.tail),
                    jnp.exp(target.tail - logq[..., -1]), 0.0)
  off = ratio[..., None] * q
  valid = jnp.isfinite(target.logp)
  delta = jnp.where(valid, jnp.exp(target.logp) - jnp.take_along_axis(off, target.ids, axis=-1), 0.0)
  flat = off.reshape(-1, off.shape[-1])
  rows = jnp.arange(flat.shape[0])[:, None]
  p_tilde = flat.at[rows, target.ids.reshape(-1, target.ids.shape[-1])].add(
      delta.reshape(-1, delta.shape[-1])).reshape(off.shape)
  return kl, q - p_tilde
