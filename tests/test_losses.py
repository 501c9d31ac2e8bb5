"""The chunked NLL equals the plain full-logits computation, in value and gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd import losses


def _reference(hidden, kernel, labels, mask):
  logp = jax.nn.log_softmax(hidden @ kernel, axis=-1)
  picked = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return -jnp.sum(picked * mask) / jnp.sum(mask)


@pytest.mark.parametrize("chunk_len", [4, 7, 64])
def test_chunked_nll_matches_full_logits(chunk_len):
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  b, t, e, v = 2, 13, 8, 37
  hidden = jax.random.normal(k1, (b, t, e))
  kernel = jax.random.normal(k2, (e, v))
  labels = jax.random.randint(k3, (b, t), 0, v)
  mask = (jax.random.uniform(k4, (b, t)) > 0.3).astype(jnp.int32)

  got, got_grads = jax.value_and_grad(losses.nll, argnums=(0, 1))(hidden, kernel, labels, mask,
                                                                  chunk_len)
  want, want_grads = jax.value_and_grad(_reference, argnums=(0, 1))(hidden, kernel, labels, mask)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_token_logprobs_shape_and_normalizer():
  hidden = jnp.ones((1, 5, 4))
  kernel = jnp.zeros((4, 10))  # Uniform distribution over 10 tokens.
  labels = jnp.zeros((1, 5), jnp.int32)
  np.testing.assert_allclose(losses.token_logprobs(hidden, kernel, labels, 2),
                             np.full((1, 5), -np.log(10.0)), rtol=1e-6)
  mask = jnp.array([[0, 1, 1, 0, 0]])
  # With an explicit normalizer the loss is sum / normalizer (a micro-batch's share).
  np.testing.assert_allclose(losses.nll(hidden, kernel, labels, mask, 2, jnp.float32(4.0)),
                             2 * np.log(10.0) / 4, rtol=1e-6)


def test_chunk_memory_is_bounded():
  """The compiled gradient never holds the whole [B, T, V] logits at once."""
  b, t, e, v, c = 1, 512, 16, 4096, 32
  fn = jax.jit(jax.grad(lambda h, k, y, m: losses.nll(h, k, y, m, c), argnums=(0, 1)))
  args = (jnp.zeros((b, t, e)), jnp.zeros((e, v)), jnp.zeros((b, t), jnp.int32),
          jnp.ones((b, t), jnp.int32))
  stats = fn.lower(*args).compile().memory_analysis()
  full_logits = b * t * v * 4
  assert stats.temp_size_in_bytes < full_logits / 4, (stats.temp_size_in_bytes, full_logits)
