"""The distillation loss: the divergence family against naive formulas, and the fused chunked
loss (values and gradients) against a full-vocabulary implementation, dense and sparse targets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd import losses
from proxykd.losses.targets import DenseTarget, SparseTarget

B, T, E, V = 2, 12, 8, 40


def _softmax_np(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


NAIVE = {  # DistiLLM-style, on probabilities
    "forward_kl": lambda p, q: np.sum(p * (np.log(p) - np.log(q)), -1),
    "reverse_kl": lambda p, q: np.sum(q * (np.log(q) - np.log(p)), -1),
    "jsd": lambda p, q, b=0.3: (b * np.sum(p * np.log(p / (b * p + (1 - b) * q)), -1)
                                + (1 - b) * np.sum(q * np.log(q / (b * p + (1 - b) * q)), -1)),
    "skew_kl": lambda p, q, lam=0.2: np.sum(p * np.log(p / (lam * p + (1 - lam) * q)), -1),
    "tvd": lambda p, q: 0.5 * np.sum(np.abs(p - q), -1),
}
PARAM = {"jsd": 0.3, "skew_kl": 0.2}


@pytest.mark.parametrize("name", sorted(NAIVE))
def test_each_divergence_equals_its_naive_formula_and_is_zero_at_equality(name):
  rng = np.random.default_rng(0)
  p, q = _softmax_np(rng.normal(size=(5, V))), _softmax_np(2 * rng.normal(size=(5, V)))
  fn = losses.divergence(name, PARAM.get(name))
  mask = np.array([1, 1, 0, 1, 1], np.float32)
  got = np.asarray(fn(jnp.log(p), jnp.log(q), mask))
  np.testing.assert_allclose(got, NAIVE[name](p, q) * mask, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fn(jnp.log(p), jnp.log(p), mask), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="config.kd.divergence='kl'"):
    losses.divergence("kl")


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(B, T, E)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(E, V)) * 0.5, jnp.float32)
  y = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  mask = jnp.asarray(rng.random((B, T)) < 0.8, jnp.float32)
  w = jnp.asarray(rng.uniform(0.2, 1.0, (B, T)), jnp.float32)
  target = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(B, T, V)) * 2, jnp.float32))
  return h, kernel, y, mask, w, target


def _naive(h, kernel, y, mask, w, target_logp, alpha, div=losses.forward_kl):
  logq = jax.nn.log_softmax(h @ kernel)
  nll = -jnp.take_along_axis(logq, y[..., None], -1)[..., 0]
  return jnp.sum(nll * mask) + alpha * jnp.sum(div(target_logp, logq, mask) * w)


def _check(fused, naive, args):
  (v1, g1), (v2, g2) = [jax.value_and_grad(f, argnums=(0, 1))(*args) for f in (fused, naive)]
  np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-5)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_dense_loss_and_gradients_equal_the_full_vocabulary_loss(name):
  h, kernel, y, mask, w, target = _inputs()
  div = losses.divergence(name, PARAM.get(name))
  dense = lambda pp, shared: DenseTarget(pp["logp"])

  def fused(h, kernel):
    return losses.distill(h, kernel, y, mask, weight=w, per_position={"logp": target},
                          target_fn=dense, alpha=3.0, chunk_len=5,
                          divergence_fn=None if name == "forward_kl" else div)[0]

  _check(fused, lambda h, k: _naive(h, k, y, mask, w, target, 3.0, div), (h, kernel))


def _sparse_target(target, k, with_label, y):
  """The top-k of `target` (plus the label) as a SparseTarget, and the bucketed naive KL."""
  top_lp, top_id = jax.lax.top_k(target, k)
  if with_label:  # append the label where it is not already in the top-k
    in_top = jnp.any(top_id == y[..., None], -1)
    top_id = jnp.concatenate([top_id, y[..., None]], -1)
    label_lp = jnp.take_along_axis(target, y[..., None], -1)
    top_lp = jnp.concatenate([top_lp, jnp.where(in_top[..., None], -jnp.inf, label_lp)], -1)
  covered = jax.nn.logsumexp(top_lp, -1)
  tail = jnp.log1p(-jnp.minimum(jnp.exp(covered), 1.0))
  return SparseTarget(top_id.astype(jnp.int32), top_lp, tail)


def _naive_bucketed(h, kernel, y, mask, w, st: SparseTarget, alpha):
  logq = jax.nn.log_softmax(h @ kernel)
  onehot = jnp.sum(jax.nn.one_hot(st.ids, V) * jnp.isfinite(st.logp)[..., None], -2)  # [B, T, V]
  q = jnp.exp(logq)
  q_support = jnp.where(jnp.isfinite(st.logp), jnp.take_along_axis(q, st.ids, -1), 0.0)
  q_tail = jnp.sum(q * (1 - onehot), -1)
  p = jnp.exp(st.logp)
  kl = (jnp.sum(jnp.where(p > 0, p * (st.logp - jnp.log(jnp.maximum(q_support, 1e-30))), 0), -1)
        + jnp.where(jnp.isfinite(st.tail), jnp.exp(st.tail) * (st.tail - jnp.log(q_tail)), 0.0))
  nll = -jnp.take_along_axis(logq, y[..., None], -1)[..., 0]
  return jnp.sum(nll * mask) + alpha * jnp.sum(kl * w * mask)


def test_fused_sparse_loss_and_gradients_equal_the_bucketed_full_vocabulary_loss():
  h, kernel, y, mask, w, target = _inputs(1)
  st = _sparse_target(target, 6, True, y)
  sparse = lambda pp, shared: SparseTarget(pp["ids"], pp["logp"], pp["tail"])

  def fused(h, kernel):
    return losses.distill(h, kernel, y, mask, weight=w, per_position=st._asdict(),
                          target_fn=sparse, alpha=2.0, chunk_len=4)[0]

  _check(fused, lambda h, k: _naive_bucketed(h, k, y, mask, w, st, 2.0), (h, kernel))
  # Any divergence over the buckets, by autodiff: forward KL that way agrees with the custom VJP.
  autodiff = lambda h, k: losses.distill(h, k, y, mask, weight=w, per_position=st._asdict(),
                                         target_fn=sparse, alpha=2.0, chunk_len=4,
                                         divergence_fn=losses.forward_kl)[0]
  _check(autodiff, fused, (h, kernel))


def test_sparse_with_the_whole_vocabulary_equals_dense_and_alpha_zero_is_the_nll():
  h, kernel, y, mask, w, target = _inputs(2)
  st = _sparse_target(target, V, False, y)  # k = V: every token on the support, no tail
  run = lambda fn, pp, alpha=1.5: losses.distill(h, kernel, y, mask, weight=w, per_position=pp,
                                                 target_fn=fn, alpha=alpha, chunk_len=6)
  dense = run(lambda pp, s: DenseTarget(pp["logp"]), {"logp": target})
  sparse = run(lambda pp, s: SparseTarget(pp["ids"], pp["logp"], pp["tail"]), st._asdict())
  for a, b in zip(dense, sparse):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  total, nll_sum, kd_sum = run(lambda pp, s: DenseTarget(pp["logp"]), {"logp": target}, alpha=0.0)
  np.testing.assert_allclose(total, losses.nll(h, kernel, y, mask, 6, normalizer=jnp.ones(())), rtol=1e-6)
  assert float(kd_sum) == 0.0 and float(total) == float(nll_sum)
