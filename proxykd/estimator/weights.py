"""Proxy sample weights (METHOD.md stage 3, paper Eq. 9).

w_i = sigmoid((l_i - mu) / s), l_i the mean log-probability of record i's response tokens under
the aligned proxy, mu and s the mean and standard deviation of l over the distillation split (one
pass before training). Responses the proxy finds typical of the teacher get weights near 1,
surprising ones (where its soft labels are least trustworthy) near 0. No gradient flows through w.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class SampleWeights:
  ids: list[str]  # record ids
  mean_logp: np.ndarray  # l_i
  weights: np.ndarray  # w_i
  mu: float
  s: float

  def by_id(self) -> dict[str, float]:
    return dict(zip(self.ids, self.weights.tolist()))


def per_record_mean_logp(logp: np.ndarray, loss_mask: np.ndarray, doc: np.ndarray,
                         docs: list[str]) -> tuple[list[str], np.ndarray]:
  """The mean of `logp` over each record's response slots in packed rows (vectorised:
  np.bincount over the rows' doc index). -> (record ids, l) for records with response slots."""
  sel = (loss_mask > 0) & (doc >= 0)
  d = doc[sel]
  sums = np.bincount(d, weights=logp[sel].astype(np.float64), minlength=len(docs))
  counts = np.bincount(d, minlength=len(docs))
  keep = counts > 0
  return [docs[i] for i in np.flatnonzero(keep)], (sums[keep] / counts[keep])


def sample_weights(ids: list[str], mean_logp: np.ndarray) -> SampleWeights:
  """Eq. 9 over the given records (the whole distillation split)."""
  mean_logp = np.asarray(mean_logp, np.float64)
  mu = float(mean_logp.mean()) if len(mean_logp) else 0.0
  s = float(mean_logp.std()) if len(mean_logp) > 1 else 0.0
  z = (mean_logp - mu) / s if s > 0 else np.zeros_like(mean_logp)  # all equal: w = 1/2
  return SampleWeights(list(ids), mean_logp, 1.0 / (1.0 + np.exp(-z)), mu, s)


def token_weights(weights: dict[str, float], doc: np.ndarray, docs: list[str],
                  default: float = 1.0) -> np.ndarray:
  """w of each slot's record ([N, T] float32; padding 0): the per-token feature the step reads."""
  table = np.asarray([weights.get(i, default) for i in docs] + [0.0], np.float32)
  return table[np.where(doc >= 0, doc, len(docs))]
