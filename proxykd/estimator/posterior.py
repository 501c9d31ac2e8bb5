"""The posterior estimate of the teacher's next-token distribution (METHOD.md Stage 2), per chunk.

At a position with prior pi (corpus n-gram, proxykd/estimator/prior.py), teacher token y (e = its
one-hot) and proxy distribution q = softmax(z / tau):

    p_hat = (kappa pi + e + m q) / (kappa + 1 + m)

the posterior mean of a Dirichlet(kappa pi) prior updated by one observed count (the teacher's
token) and m pseudo-counts of the proxy in expectation. `include_label=False` drops e (the estimate
calibration scores held-out tokens with: (kappa pi + m q) / (kappa + m)). With the teacher's top-k
log-probabilities (ids mapped to our vocabulary, -1 where there is none), p_hat(w) = T(w) on them
and the rest of the mass, 1 - sum T, is shared by the other tokens in proportion to p_hat.

Every function is pure and jit-able; kappa, m and tau may be traced scalars (one compiled kernel
for a whole calibration grid). The limits are exact, not approximate: kappa = 0 and m = 0 give the
components zero weight (log 0 = -inf), m = inf gives q alone (pure proxy soft labels), kappa = m =
0 the one-hot label (log p_hat = 0 at y, -inf elsewhere). Outputs are log-probabilities and may be
-inf where p_hat is exactly 0: a KL over them must use p_hat * (log p_hat - log s) only where
p_hat > 0 (xlogy). No gradient flows through the estimate (it is a target).

Memory: the dense kernel works on one chunk [c, V] of positions at a time (a few [c, V] float32
temporaries); call it per chunk inside the chunked student loss, never on all N positions. The
sparse kernel (the offline cache: proxy top-k ids, log-probs and the log-mass of the rest) never
builds a vocabulary-sized array: it returns p_hat on the union of the label, the teacher's ids,
the prior's top-K and the proxy's top-k, plus one bucket for every other token.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -jnp.inf


class Prior(NamedTuple):
  """pi in sparse form (the `prior_*` batch features): pi(ids[..., k]) = probs[..., k], every other
  id has probability `rest`."""
  ids: Array  # int32 [..., K], distinct
  probs: Array  # float32 [..., K]
  rest: Array  # float32 [...]


class TeacherTopK(NamedTuple):
  """The teacher's top-k at each position, mapped to our ids (-1: none at that slot)."""
  ids: Array  # int32 [..., kt]
  logprobs: Array  # float32 [..., kt]


class Weights(NamedTuple):
  """Log mixture weights of pi, the label's one-hot and q (each may be -inf)."""
  prior: Array
  label: Array
  proxy: Array


def weights(kappa, m, include_label: bool = True) -> Weights:
  """Exact at the limits: m = inf -> (-inf, -inf, 0); kappa = 0 or m = 0 -> that weight -inf.
  Without the label, kappa = m = 0 leaves nothing to mix (NaN weights)."""
  kappa = jnp.asarray(kappa, jnp.float32)
  m = jnp.asarray(m, jnp.float32)
  inf_m = jnp.isinf(m)
  m_finite = jnp.where(inf_m, 0.0, m)
  label = 1.0 if include_label else 0.0
  den = kappa + label + m_finite
  w_prior = jnp.where(inf_m, 0.0, kappa / den)
  w_label = jnp.where(inf_m, 0.0, label / den)
  w_proxy = jnp.where(inf_m, 1.0, m_finite / den)
  return Weights(jnp.log(w_prior), jnp.log(w_label), jnp.log(w_proxy))


def mix(log_prior: Array, log_proxy: Array, is_label: Array, w: Weights) -> Array:
  """log p_hat elementwise from log pi, log q and whether the token is the label."""
  log_label = jnp.where(is_label, 0.0, NEG_INF)
  out = jnp.logaddexp(w.prior + log_prior, w.proxy + log_proxy)
  return jnp.logaddexp(out, w.label + log_label)


def dense_log_prior(prior: Prior, vocab_size: int) -> Array:
  """log pi over the full vocabulary, [..., V] (one chunk's worth)."""
  lead = prior.rest.shape
  out = jnp.broadcast_to(jnp.log(prior.rest.astype(jnp.float32))[..., None], (*lead, vocab_size))
  flat = out.reshape(-1, vocab_size)
  rows = jnp.arange(flat.shape[0])[:, None]
  flat = flat.at[rows, prior.ids.reshape(flat.shape[0], -1)].set(
      jnp.log(prior.probs.astype(jnp.float32)).reshape(flat.shape[0], -1))
  return flat.reshape(*lead, vocab_size)


def _scatter(ids: Array, values: Array, vocab_size: int, fill) -> Array:
  """[..., V] with `values` at `ids` (ids < 0 dropped) and `fill` elsewhere."""
  lead = ids.shape[:-1]
  flat_ids = ids.reshape(-1, ids.shape[-1])
  rows = jnp.arange(flat_ids.shape[0])[:, None]
  out = jnp.full((flat_ids.shape[0], vocab_size), fill, values.dtype)
  out = out.at[rows, jnp.where(flat_ids >= 0, flat_ids, vocab_size)].set(
      values.reshape(flat_ids.shape), mode="drop")
  return out.reshape(*lead, vocab_size)


def _teacher_mass(teacher: TeacherTopK) -> tuple[Array, Array]:
  """(whether the position has any mapped teacher token, log of 1 - their total probability)."""
  valid = teacher.ids >= 0
  mass = jnp.sum(jnp.where(valid, jnp.exp(teacher.logprobs.astype(jnp.float32)), 0.0), axis=-1)
  return jnp.any(valid, axis=-1), jnp.log1p(-jnp.minimum(mass, 1.0))


def _override(log_p: Array, in_s: Array, log_t: Array, has: Array, log_rest_t: Array,
              log_out: Array, others: Array) -> Array:
  """Teacher override on a set of tokens: T on S, (1 - sum T) p_hat / p_hat(not S) elsewhere; if
  p_hat has no mass outside S, the remaining teacher mass is spread evenly over the `others`
  tokens outside S."""
  degenerate = jnp.isneginf(log_out)[..., None]
  spread = (log_rest_t - jnp.log(jnp.maximum(others, 1.0)))[..., None]
  outside = jnp.where(degenerate, spread, log_rest_t[..., None] + log_p - jnp.where(
      degenerate, 0.0, log_out[..., None]))
  return jnp.where(has[..., None], jnp.where(in_s, log_t, outside), log_p)


def posterior_logprobs(logits: Array, prior: Prior, labels: Array, kappa, m, tau, *,
                       include_label: bool = True, teacher: TeacherTopK | None = None) -> Array:
  """log p_hat [c, V] for one chunk: proxy logits [c, V], prior features [c, K] / [c], labels [c]."""
  v = logits.shape[-1]
  logits, labels = jax.lax.stop_gradient(logits), labels.astype(jnp.int32)
  log_q = jax.nn.log_softmax(logits.astype(jnp.float32) / jnp.asarray(tau, jnp.float32), axis=-1)
  is_label = jax.lax.broadcasted_iota(jnp.int32, log_q.shape, log_q.ndim - 1) == labels[..., None]
  log_p = mix(dense_log_prior(prior, v), log_q, is_label, weights(kappa, m, include_label))
  if teacher is not None:
    has, log_rest_t = _teacher_mass(teacher)
    in_s = _scatter(teacher.ids, jnp.ones(teacher.ids.shape, bool), v, False)
    log_t = _scatter(teacher.ids, teacher.logprobs.astype(jnp.float32), v, NEG_INF)
    log_out = jax.nn.logsumexp(jnp.where(in_s, NEG_INF, log_p), axis=-1)
    others = v - jnp.sum(in_s, axis=-1).astype(jnp.float32)
    log_p = _override(log_p, in_s, log_t, has, log_rest_t, log_out, others)
  return jax.lax.stop_gradient(log_p)


def _lookup(support: Array, ids: Array, values: Array, missing: Array) -> Array:
  """values at each support id where it is one of `ids` (distinct), else `missing` [...]."""
  match = support[..., :, None] == ids[..., None, :]
  found = jnp.any(match, axis=-1)
  picked = jnp.take_along_axis(values, jnp.argmax(match, axis=-1), axis=-1)
  return jnp.where(found, picked, missing[..., None])


def posterior_logprobs_sparse(proxy_ids: Array, proxy_logprobs: Array, proxy_log_tail: Array,
                              prior: Prior, labels: Array, kappa, m, vocab_size: int, *,
                              include_label: bool = True, teacher: TeacherTopK | None = None
                              ) -> tuple[Array, Array, Array]:
  """p_hat from the offline proxy cache, on a support instead of the vocabulary.

  Inputs per position: the proxy's top-k ids [c, k], their log q [c, k] (already at the cache's
  temperature: q is not re-tempered here) and the log of the mass of every other token [c]; the
  prior features; labels; optionally the teacher's top-k. Outside its top-k the proxy's remaining
  mass is spread evenly (the cache does not say how it is shared), as pi spreads `rest`.

  Returns (support ids [c, S], log p_hat [c, S], log p_hat of all other tokens together [c]) with
  S = 1 + kt + K + k slots: the label, the teacher's ids, the prior's and the proxy's; a slot whose
  id repeats an earlier slot's (or is -1) has log p_hat = -inf, so each token counts once.
  """
  labels = labels.astype(jnp.int32)
  parts = [labels[..., None]] + ([teacher.ids.astype(jnp.int32)] if teacher is not None else []) + \
      [prior.ids.astype(jnp.int32), proxy_ids.astype(jnp.int32)]
  support = jnp.concatenate(parts, axis=-1)
  s = support.shape[-1]
  valid = support >= 0
  earlier = jnp.tril(jnp.ones((s, s), bool), -1)  # [i, j]: j before i
  repeated = jnp.any((support[..., :, None] == support[..., None, :]) & earlier & valid[..., None, :],
                     axis=-1)
  unique = valid & ~repeated
  n_unique = jnp.sum(unique, axis=-1).astype(jnp.float32)
  k_q = proxy_ids.shape[-1]
  log_q_spread = proxy_log_tail.astype(jnp.float32) - jnp.log(float(max(vocab_size - k_q, 1)))
  log_rest = jnp.log(prior.rest.astype(jnp.float32))
  log_pi = _lookup(support, prior.ids, jnp.log(prior.probs.astype(jnp.float32)), log_rest)
  log_q = _lookup(support, proxy_ids, proxy_logprobs.astype(jnp.float32), log_q_spread)
  w = weights(kappa, m, include_label)
  log_p = jnp.where(unique, mix(log_pi, log_q, support == labels[..., None], w), NEG_INF)
  # Every id outside the support has pi = rest, q = the spread tail and no label mass.
  log_tail = jnp.log(jnp.maximum(vocab_size - n_unique, 0.0)) + jnp.logaddexp(
      w.prior + log_rest, w.proxy + log_q_spread)
  if teacher is not None:
    has, log_rest_t = _teacher_mass(teacher)
    valid_t = teacher.ids >= 0
    in_s = unique & jnp.any((support[..., :, None] == teacher.ids[..., None, :]) & valid_t[..., None, :],
                            axis=-1)
    log_t = _lookup(support, jnp.where(valid_t, teacher.ids, -2), teacher.logprobs.astype(jnp.float32),
                    jnp.full(labels.shape, NEG_INF))
    both = jnp.concatenate([jnp.where(in_s, NEG_INF, log_p), log_tail[..., None]], axis=-1)
    log_out = jax.nn.logsumexp(both, axis=-1)
    others = vocab_size - jnp.sum(in_s, axis=-1).astype(jnp.float32)
    joint = _override(jnp.concatenate([log_p, log_tail[..., None]], axis=-1),
                      jnp.concatenate([in_s, jnp.zeros_like(in_s[..., :1])], axis=-1),
                      jnp.concatenate([log_t, log_t[..., :1]], axis=-1), has, log_rest_t, log_out,
                      others)
    # The tail bucket holds (V - n_unique) of the `others` tokens when spread evenly.
    spread_tail = log_rest_t - jnp.log(jnp.maximum(others, 1.0)) + jnp.log(
        jnp.maximum(vocab_size - n_unique, 0.0))
    tail = jnp.where(has & jnp.isneginf(log_out), spread_tail, joint[..., -1])
    log_p = jnp.where(unique, joint[..., :-1], NEG_INF)
    log_tail = tail
  return (jax.lax.stop_gradient(support), jax.lax.stop_gradient(log_p),
          jax.lax.stop_gradient(log_tail))


def label_logprob(log_prior_y: Array, log_proxy_y: Array, kappa, m, include_label: bool = False
                  ) -> Array:
  """log p_hat(y) at the label only, from log pi(y) and log q(y): what calibration scores (no
  vocabulary-sized work; the same mixture as the kernels above)."""
  return mix(log_prior_y, log_proxy_y, jnp.full(jnp.shape(log_prior_y), include_label),
             weights(kappa, m, include_label))
