"""Preference losses for DPO-style alignment, selected by name (TRL's names).

One function per loss, same signature: the per-pair loss from the log-ratios
log pi(y|x) - log pi_ref(y|x) of the chosen and the rejected response, summed over their tokens.
"""
from __future__ import annotations

import jax

Array = jax.Array


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
