"""The alignment loss of METHOD.md stage 1: nll_weight * NLL(chosen) + lambda * preference loss.

Batches hold packed pairs (proxykd/data/pairs.py): per token `dpo_role` (1 chosen, 2 rejected) and
`ref_logp`, the reference model's log-probability of the token, computed once per round by a
scoring pass (proxykd/train/scoring.py), so the reference never runs inside the step. Log-probs are
summed over each response's tokens; the NLL of the chosen response is its per-token mean; the loss
is normalised per pair.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from proxykd import losses
from proxykd.data.pairs import CHOSEN, REJECTED
from proxykd.models.config import ModelConfig
from proxykd.models.transformer import Transformer, lm_head_kernel
from proxykd.train.step import Loss


def pair_count(batch: dict) -> jax.Array:
  """Pairs in a batch: chosen documents (their first slot has position 0)."""
  first = (batch["positions"] == 0) & (batch["segment_ids"] > 0)
  return jnp.sum(first & (batch["dpo_role"] == CHOSEN)).astype(jnp.float32)


def pair_sums(values: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
  """Per row and pair, the sums of `values` [B, T] over the response tokens of the chosen and of
  the rejected response: ([B, P], [B, P]), P = T // 2 + 1 pair slots per row."""
  t = values.shape[1]
  pair = jnp.maximum(batch["segment_ids"] - 1, 0) // 2
  mask = batch["loss_mask"].astype(values.dtype) * (batch["segment_ids"] > 0)

  def per_row(v, p, role):
    return jax.ops.segment_sum(v * (role == CHOSEN), p, t // 2 + 1), \
        jax.ops.segment_sum(v * (role == REJECTED), p, t // 2 + 1)

  return jax.vmap(per_row)(values * mask, pair, batch["dpo_role"])


def dpo_loss(cfg: ModelConfig, *, beta: float, lam: float, nll_weight: float, kind: str,
             chunk_len: int = 256) -> Loss:
  preference = losses.preference_loss(kind)
  model = Transformer(cfg)

  def fn(params, frozen, batch, rng):
    del frozen, rng
    hidden = model.apply({"params": params}, batch["inputs"], batch["positions"],
                         batch["segment_ids"], return_hidden=True)
    logp = losses.token_logprobs(hidden, lm_head_kernel(params, cfg), batch["targets"], chunk_len)
    chosen, rejected = pair_sums(logp, batch)
    ref_chosen, ref_rejected = pair_sums(batch["ref_logp"], batch)
    n_chosen, _ = pair_sums(jnp.ones_like(logp), batch)
    valid = (n_chosen > 0).astype(jnp.float32)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    pref = preference(chosen_ratio, rejected_ratio, beta) * valid
    nll = -chosen / jnp.maximum(n_chosen, 1.0) * valid  # per-pair mean over the chosen tokens
    pairs = jnp.sum(valid)
    total = jnp.sum(nll_weight * nll + lam * pref)
    margin = beta * (chosen_ratio - rejected_ratio)
    metrics = {
        "dpo/loss": (jnp.sum(pref), pairs),
        "dpo/accuracy": (jnp.sum((chosen_ratio > rejected_ratio) * valid), pairs),
        "dpo/margin": (jnp.sum(margin * valid), pairs),
        "dpo/chosen_logp": (jnp.sum(chosen * valid), pairs),
        "dpo/rejected_logp": (jnp.sum(rejected * valid), pairs),
        "sft/nll": (-jnp.sum(chosen * valid), jnp.sum(n_chosen * valid)),
    }
    return total, metrics

  return Loss(fn, pair_count)
