"""The preference losses on fixed log-probs, and one DPO step on one packed pair."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from proxykd import losses
from proxykd.data import packing, pairs
from proxykd.data.tokenize import Example
from proxykd.models import checkpoint
from proxykd.models.config import preset
from proxykd.train import preference, scoring, sharding as shd, step as sp

CHOSEN, REJECTED = np.array([-3.0, -1.0]), np.array([-5.0, -0.5])  # log-ratios of two pairs


def test_preference_losses_equal_hand_computed_values():
  beta = 0.5
  h = CHOSEN - REJECTED  # [2.0, -0.5]
  np.testing.assert_allclose(losses.sigmoid_preference(CHOSEN, REJECTED, beta),
                             [np.log1p(np.exp(-1.0)), np.log1p(np.exp(0.25))], rtol=1e-6)
  np.testing.assert_allclose(losses.ipo_preference(CHOSEN, REJECTED, beta), (h - 1.0) ** 2, rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_preference(CHOSEN, REJECTED, beta), [0.0, 1.25], rtol=1e-6)
  # beta -> 0: DPO forgets the margin (log 2), the hinge sits at 1.
  np.testing.assert_allclose(losses.sigmoid_preference(CHOSEN, REJECTED, 1e-9), np.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(losses.hinge_preference(CHOSEN, REJECTED, 1e-9), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="config.dpo.loss='kto'"):
    losses.preference_loss("kto")


CFG = preset("tiny")


def _pair_rows():
  """One pair (chosen: the teacher's 12 response tokens; rejected: 9 other ones) in one row."""
  prompt = np.arange(10, 18, dtype=np.int32)
  chosen = Example(np.concatenate([prompt, np.arange(100, 112)]).astype(np.int32),
                   np.arange(20) >= 8, "r0")
  sample = pairs.Sample("r0", list(range(300, 309)), "stop")
  units, counts = pairs.build_pairs([chosen], {"r0": sample}, seq_len=64, truncation="truncate_response",
                                    end_ids=[], decode=lambda ids: " ".join(map(str, ids)),
                                    policy={"empty": "drop", "truncated": "keep", "identical": "drop"})
  assert counts["pairs"] == 1
  rows = packing.pack(units, 64)
  assert rows.arrays["segment_ids"][0].max() == 2  # chosen = segment 1, rejected = segment 2
  return rows


def _margin_and_grads(loss, params, batch):
  def objective(p):
    total, metrics = loss.fn(p, {}, batch, jax.random.PRNGKey(0))
    return total / loss.normalizer(batch), metrics
  (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
  return value, metrics, grads


@pytest.mark.parametrize("kind", ["sigmoid", "ipo", "hinge"])
def test_one_step_on_one_pair_increases_its_margin(kind):
  rows = _pair_rows()
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  params = checkpoint.load_params({"random": 0}, CFG)
  rows.arrays["ref_logp"] = scoring.Scorer(CFG, mesh, 1, 64, 16)(params, rows)["logp"]
  batch = {k: jnp.asarray(v) for k, v in rows.arrays.items()}
  loss = preference.dpo_loss(CFG, beta=0.1, lam=1.0, nll_weight=0.0, kind=kind, chunk_len=16)
  assert float(loss.normalizer(batch)) == 1.0
  _, before, grads = _margin_and_grads(loss, params, batch)
  np.testing.assert_allclose(before["dpo/margin"][0], 0.0, atol=1e-5)  # policy == reference
  tx = optax.sgd(0.5)
  params = optax.apply_updates(params, tx.update(grads, tx.init(params))[0])
  _, after, _ = _margin_and_grads(loss, params, batch)
  assert float(after["dpo/margin"][0]) > 1e-3
  assert float(after["dpo/accuracy"][0]) == 1.0


def test_lambda_zero_is_the_chosen_nll():
  rows = _pair_rows()
  params = checkpoint.load_params({"random": 0}, CFG)
  rows.arrays["ref_logp"] = np.zeros_like(rows.arrays["targets"], np.float32)
  batch = {k: jnp.asarray(v) for k, v in rows.arrays.items()}
  value, metrics, _ = _margin_and_grads(
      preference.dpo_loss(CFG, beta=0.1, lam=0.0, nll_weight=1.0, kind="sigmoid", chunk_len=16),
      params, batch)
  nll_sum, n_tokens = metrics["sft/nll"]
  assert float(n_tokens) == 12  # the chosen response's tokens
  np.testing.assert_allclose(value, nll_sum / n_tokens, rtol=1e-6)
  chosen_only = dict(batch, loss_mask=batch["loss_mask"] * (batch["dpo_role"] == pairs.CHOSEN))
  ref = sp.sft_loss(CFG, 16).fn(params, {}, chosen_only, None)[0] / 12
  np.testing.assert_allclose(value, ref, rtol=1e-5)
