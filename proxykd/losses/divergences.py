"""The divergence family of distillation (DistiLLM's), one function per divergence, same signature.

D(p || q) from the log-probabilities of the target p and the student q over the same last axis (the
vocabulary, or the buckets of a sparse target) and a mask; returns the per-position divergence times
the mask. 0 * log 0 counts as 0.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


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
