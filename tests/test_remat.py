"""Remat policies by name: each gives the gradients of `none`, and each keeps what it says."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # jax.ad_checkpoint exports only the printer.

from proxykd.models.config import REMAT_POLICIES, ModelConfig, preset
from proxykd.models.transformer import REMAT_POLICIES as POLICY_TABLE, Transformer, init_params

# Distinct sizes, so that every saved activation is recognisable by its shape.
CFG = ModelConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=10, attention="xla")
L, B, T = 2, 3, 8
Q, KV, E, F = (L, B, T, 4, 10), (L, B, T, 2, 10), (L, B, T, 48), (L, B, T, 80)


def _batch():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (B, T)), jnp.int32)
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1] * T, [1] * T], jnp.int32)  # Packed rows.
  positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0], list(range(T)), list(range(T))], jnp.int32)
  return tokens, positions, segments


def _loss(cfg):
  tokens, positions, segments = _batch()
  return lambda p: jnp.mean(Transformer(cfg).apply({"params": p}, tokens, positions, segments) ** 2)


def test_every_policy_name_has_a_policy():
  assert set(REMAT_POLICIES) == set(POLICY_TABLE) | {"none"}
  with pytest.raises(ValueError, match="model.remat must be one of none|full|dots|minimal"):
    preset("tiny", remat="everything")


@pytest.fixture(scope="module")
def params_and_reference():
  params = init_params(CFG, jax.random.PRNGKey(0))
  return params, jax.jit(jax.value_and_grad(_loss(CFG)))(params)


@pytest.mark.parametrize("remat", [r for r in REMAT_POLICIES if r != "none"])
def test_each_policy_gives_the_gradients_of_none(remat, params_and_reference):
  params, (ref_loss, ref_grads) = params_and_reference
  loss, grads = jax.jit(jax.value_and_grad(_loss(CFG.replace(remat=remat))))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-6, rtol=0), grads, ref_grads)


def _saved_layer_activations(remat: str) -> collections.Counter:
  """(shape, on host) of every per-layer activation the backward pass reads from the forward."""
  params = init_params(CFG, jax.random.PRNGKey(0))
  saved = collections.Counter()
  for aval, source in saved_residuals(_loss(CFG.replace(remat=remat)), params):
    if source.startswith("output of scan") and aval.shape[0] == L:  # Stacked by the layer scan.
      saved[(tuple(aval.shape), "<host>" in aval.str_short())] += 1
  return saved


@pytest.mark.parametrize("remat,kept", [
    ("full", {E: 1}),  # Only each layer's input.
    ("minimal", {Q: 1, KV: 2, E: 2, F: 2}),  # + q, k, v, out_proj, mlp gate and up.
    ("minimal_with_context", {Q: 2, KV: 2, E: 2, F: 2}),  # + the attention output.
    ("save_qkv_proj", {Q: 1, KV: 2, E: 1}),
    ("save_out_proj", {E: 2}),
    # Every matmul without batch dims (not attention's), as the [tokens, out] products.
    ("dots", {E: 1, (L, B * T, 40): 1, (L, B * T, 20): 2, (L, B * T, 48): 1, (L, B * T, 80): 2}),
])
def test_each_policy_keeps_what_it_names(remat, kept):
  assert _saved_layer_activations(remat) == collections.Counter(
      {(shape, False): n for shape, n in kept.items()})


def test_offload_policies_keep_their_activations_in_host_memory():
  assert _saved_layer_activations("minimal_offload") == collections.Counter(
      {(E, False): 1, (Q, True): 1, (KV, True): 2, (E, True): 1, (F, True): 2})
  assert _saved_layer_activations("save_qkv_proj_offload") == collections.Counter(
      {(E, False): 1, (Q, True): 1, (KV, True): 2})
