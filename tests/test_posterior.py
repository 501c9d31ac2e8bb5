"""The posterior kernel against a NumPy reference (float64) on random inputs: dense proxy logits and
the offline top-k form, every special case exact, the teacher top-k override."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd.estimator import posterior
from proxykd.estimator.posterior import Prior, TeacherTopK

C, V, K, KQ, KT = 7, 40, 5, 6, 3
SETTINGS = [(2.0, 3.0), (0.0, 3.0), (2.0, 0.0), (2.0, np.inf), (0.0, 0.0), (0.5, 40.0)]


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0, 2, (C, V)).astype(np.float32)
  ids = np.stack([rng.choice(V, K, replace=False) for _ in range(C)]).astype(np.int32)
  probs = rng.dirichlet(np.ones(K + 1), C)[:, :K] * 0.9
  rest = (1 - probs.sum(1)) / (V - K)
  labels = rng.integers(0, V, C).astype(np.int32)
  labels[0] = ids[0, 2]  # a label inside the prior's top-K
  t_ids = np.stack([rng.choice(V, KT, replace=False) for _ in range(C)]).astype(np.int32)
  t_ids[1, 2] = -1  # a teacher token that did not map
  t_ids[2] = -1  # a position without teacher tokens: no override
  t_ids[3, 0] = labels[3]
  t_lp = np.log(rng.dirichlet(np.ones(KT + 1), C)[:, :KT])
  return (logits, Prior(ids, probs.astype(np.float32), rest.astype(np.float32)), labels,
          TeacherTopK(t_ids, t_lp.astype(np.float32)))


def _dense_pi(prior):
  pi = np.repeat(prior.rest.astype(np.float64)[:, None], V, 1)
  np.put_along_axis(pi, prior.ids.astype(np.int64), prior.probs.astype(np.float64), 1)
  return pi


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _reference(pi, q, labels, kappa, m, include_label, teacher=None):
  e = np.eye(V)[labels] if include_label else np.zeros((len(labels), V))
  if np.isinf(m):
    p = q.copy()
  else:
    p = (kappa * pi + e + m * q) / (kappa + float(include_label) + m)
  if teacher is not None:
    for i in range(len(labels)):
      ok = teacher.ids[i] >= 0
      if not ok.any():
        continue
      s = teacher.ids[i][ok].astype(np.int64)
      t = np.exp(teacher.logprobs[i][ok].astype(np.float64))
      out = np.ones(V, bool)
      out[s] = False
      rest = p[i, out].sum()  # no mass outside S (a one-hot label in S): spread evenly
      p[i, out] = (1 - t.sum()) * (p[i, out] / rest if rest > 0 else 1.0 / out.sum())
      p[i, s] = t
  return p


def _close(log_p, ref):
  """|p - ref| <= 1e-6 and the exact zeros of the reference are -inf (float32 kernel)."""
  p = np.exp(np.asarray(log_p, np.float64))
  np.testing.assert_allclose(p, ref, atol=1e-6, rtol=0)
  assert np.array_equal(np.isneginf(np.asarray(log_p)), ref == 0)
  assert not np.isnan(np.asarray(log_p)).any()


@pytest.mark.parametrize("kappa,m", SETTINGS)
@pytest.mark.parametrize("include_label", [True, False])
def test_dense_kernel_matches_numpy(kappa, m, include_label):
  if not include_label and kappa == 0 and m == 0:
    pytest.skip("nothing to mix")
  logits, prior, labels, teacher = _inputs()
  tau = 1.7
  ref = _reference(_dense_pi(prior), _softmax(logits.astype(np.float64) / tau), labels, kappa, m,
                   include_label)
  kernel = jax.jit(posterior.posterior_logprobs, static_argnames="include_label")
  _close(kernel(logits, prior, labels, kappa, m, tau, include_label=include_label), ref)
  with_teacher = _reference(_dense_pi(prior), _softmax(logits.astype(np.float64) / tau), labels,
                            kappa, m, include_label, teacher)
  _close(posterior.posterior_logprobs(logits, prior, labels, kappa, m, tau,
                                      include_label=include_label, teacher=teacher), with_teacher)


def test_limits_are_exact():
  """The limiting settings give the other components weight exactly zero (log weight -inf)."""
  w = lambda *a: tuple(float(x) for x in posterior.weights(*a))  # (prior, label, proxy)
  assert w(5.0, np.inf, True) == (-np.inf, -np.inf, 0.0)  # m = inf: q alone
  assert w(0.0, 0.0, True) == (-np.inf, 0.0, -np.inf)  # kappa = m = 0: the one-hot label
  assert w(0.0, 3.0, True)[0] == -np.inf and w(2.0, 0.0, True)[2] == -np.inf
  assert w(2.0, 0.0, False) == (0.0, -np.inf, -np.inf)  # no label, m = 0: pi alone
  logits, prior, labels, _ = _inputs(1)
  one_hot = posterior.posterior_logprobs(logits, prior, labels, 0.0, 0.0, 1.0)
  assert np.array_equal(np.asarray(one_hot), np.where(np.eye(V)[labels] > 0, 0.0, -np.inf))
  proxy = posterior.posterior_logprobs(logits, prior, labels, 5.0, np.inf, 0.8)
  np.testing.assert_allclose(np.asarray(proxy), np.asarray(jax.nn.log_softmax(logits / 0.8)),
                             rtol=1e-6)
  prior_only = posterior.posterior_logprobs(logits, prior, labels, 3.0, 0.0, 1.0, include_label=False)
  assert np.array_equal(np.asarray(prior_only), np.asarray(posterior.dense_log_prior(prior, V)))


def _sparse_reference(proxy_ids, proxy_lp, labels, prior, kappa, m, include_label, teacher=None):
  """The offline semantics written densely: q known on the proxy's top-k, its tail spread evenly."""
  tail = 1 - np.exp(proxy_lp.astype(np.float64)).sum(1)
  q = np.repeat((tail / (V - KQ))[:, None], V, 1)
  np.put_along_axis(q, proxy_ids.astype(np.int64), np.exp(proxy_lp.astype(np.float64)), 1)
  return _reference(_dense_pi(prior), q, labels, kappa, m, include_label, teacher)


@pytest.mark.parametrize("kappa,m", SETTINGS)
@pytest.mark.parametrize("use_teacher", [False, True])
def test_sparse_kernel_matches_numpy(kappa, m, use_teacher):
  logits, prior, labels, teacher = _inputs(2)
  teacher = teacher if use_teacher else None
  order = np.argsort(-logits, 1)[:, :KQ].astype(np.int32)
  order[4, 0] = prior.ids[4, 1]  # overlaps between the proxy's and the prior's ids
  proxy_lp = np.log(_softmax(logits.astype(np.float64)))
  proxy_lp = np.take_along_axis(proxy_lp, order.astype(np.int64), 1).astype(np.float32)
  log_tail = np.log1p(-np.exp(proxy_lp.astype(np.float64)).sum(1)).astype(np.float32)
  ids, log_p, log_rest = jax.jit(posterior.posterior_logprobs_sparse, static_argnums=7)(
      order, proxy_lp, log_tail, prior, labels, kappa, m, V, teacher=teacher)
  ids, log_p, log_rest = map(np.asarray, (ids, log_p, log_rest))
  ref = _sparse_reference(order, proxy_lp, labels, prior, kappa, m, True, teacher)
  for i in range(C):
    first = [j for j in range(ids.shape[1]) if ids[i, j] >= 0 and ids[i, j] not in ids[i, :j]]
    assert sorted(ids[i, first]) == sorted(set(ids[i][ids[i] >= 0]))
    np.testing.assert_allclose(np.exp(log_p[i, first].astype(np.float64)), ref[i, ids[i, first]],
                               atol=1e-6, rtol=0)
    assert all(np.isneginf(log_p[i, j]) for j in range(ids.shape[1]) if j not in first)
    outside = np.ones(V, bool)
    outside[ids[i, first]] = False
    np.testing.assert_allclose(np.exp(float(log_rest[i])), ref[i, outside].sum(), atol=1e-6, rtol=0)


def test_label_only_scoring_equals_the_dense_kernel_at_the_label():
  logits, prior, labels, _ = _inputs(3)
  log_pi = np.asarray(posterior.dense_log_prior(prior, V))
  log_q = np.asarray(jax.nn.log_softmax(logits / 1.3))
  rows = np.arange(C)
  for kappa, m in SETTINGS[:-2] + [(1.0, 1e6)]:
    for include_label in (False, True):
      dense = posterior.posterior_logprobs(logits, prior, labels, kappa, m, 1.3,
                                           include_label=include_label)
      at_label = posterior.label_logprob(log_pi[rows, labels], log_q[rows, labels], kappa, m,
                                         include_label)
      np.testing.assert_allclose(np.asarray(at_label), np.asarray(dense)[rows, labels], atol=1e-6)


def test_runs_chunk_by_chunk_under_lax_map_with_traced_settings():
  """The way a fused chunked loss calls it: per chunk of positions, kappa/m/tau traced."""
  logits, prior, labels, _ = _inputs(4)
  n_chunks = 1
  whole = posterior.posterior_logprobs(logits, prior, labels, 1.5, 2.0, 0.9)

  @jax.jit
  def chunked(logits, prior, labels, settings):
    kappa, m, tau = settings
    xs = jax.tree_util.tree_map(lambda x: x.reshape(n_chunks, -1, *x.shape[1:]), (logits, prior, labels))
    out = jax.lax.map(jax.checkpoint(lambda a: jnp.sum(jnp.exp(
        posterior.posterior_logprobs(a[0], a[1], a[2], kappa, m, tau)) * a[0], axis=-1)), xs)
    return out.reshape(-1)

  got = chunked(logits, prior, labels, jnp.array([1.5, 2.0, 0.9]))
  np.testing.assert_allclose(np.asarray(got), np.sum(np.exp(np.asarray(whole)) * logits, -1),
                             rtol=1e-5, atol=1e-5)
