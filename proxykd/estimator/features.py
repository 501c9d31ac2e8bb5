"""The corpus prior as per-token features of packed rows, computed on the host for whole batches.

`PriorFeature` is a per-batch host feature (proxykd/data/batches.py `BatchFeature`): from a local
batch of packed rows it reads each slot's history (the previous response tokens of the same
document) and target, queries the prior for all response slots at once and adds three fixed-shape
arrays the jitted step receives:
  prior_ids [rows, T, K] int32, prior_probs [rows, T, K] float32, prior_rest [rows, T] float32
(pi(prior_ids[k]) = prior_probs[k], pi(w) = prior_rest for every other id w). Slots without a
response target (prompt, padding) get the uniform distribution, so a kernel that reads them
computes finite numbers that the loss mask then drops.

Where a slot's response starts. The prior was counted on each record's response tokens, with BOS
symbols before the first one; a slot's history is the `order - 1` tokens before its target within
the response. For rows of the prior's own corpus the record's response start is known exactly
(from the counts), so the history is exactly the counted one and leave-one-out removes exactly this
occurrence. For other rows (held-out) it is counted within the row: the response targets of the
slot's document before it. (That count is one short only if truncate_prompt cut a record's whole
prompt, making its first response token the row's first input, which no slot predicts: then its
first `order - 1` targets see a shorter history; the prior there is still a proper distribution.)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from proxykd.estimator.prior import PriorView, uniform_prior

KEYS = ("prior_ids", "prior_probs", "prior_rest")


def response_index(batch: dict[str, np.ndarray], doc_start: np.ndarray | None) -> np.ndarray:
  """[rows, T]: index of each slot's target within its record's response (-1: not a response
  target). `doc_start[d]`: where record `doc == d`'s response starts in its tokenisation (the
  `offset` of its first response target), or None to count response targets within the row."""
  mask = batch["loss_mask"] > 0
  if doc_start is not None:
    doc = batch["doc"]
    start = doc_start[np.maximum(doc, 0)]
    return np.where(mask & (doc >= 0), batch["offset"] - start, -1)
  t = np.arange(mask.shape[1])[None, :]
  seg_start = np.maximum(t - batch["positions"], 0)  # positions restart at 0 in every document
  before = np.concatenate([np.zeros((mask.shape[0], 1), np.int64), np.cumsum(mask, axis=1)], axis=1)
  count = before[:, 1:] - np.take_along_axis(before, seg_start, axis=1)  # response targets so far
  return np.where(mask, count - 1, -1)


def histories(batch: dict[str, np.ndarray], index: np.ndarray, length: int, bos: int) -> np.ndarray:
  """[rows, T, length]: the `length` tokens before each slot's target within the response, oldest
  first, BOS where the response has none. Token j before slot t's target is inputs[t - j + 1]."""
  inputs = batch["inputs"]
  rows, t = inputs.shape
  out = np.full((rows, t, length), bos, np.int64)
  slot = np.arange(t)[None, :]
  for j in range(1, length + 1):
    src = slot - j + 1
    ok = (index - j >= 0) & (src >= 0)
    out[:, :, length - j] = np.where(ok, np.take_along_axis(inputs, np.maximum(src, 0), axis=1), bos)
  return out


class PriorFeature:
  """A BatchFeature adding the prior's top-K (KEYS) to a local batch of `rows`-derived arrays.

  `docs`: the record ids the rows' `doc` indexes (packing.Rows.docs). `corpus_rows`: whether these
  rows are of the corpus the prior was counted on (the distillation split: leave-one-out), or not
  (held-out rows). Both are checked against the records the prior counted, so a training split can
  not be queried as held-out, nor held-out rows with leave-one-out.
  """

  def __init__(self, view: PriorView, docs: Sequence[str], *, corpus_rows: bool):
    self.view, self.corpus_rows = view, corpus_rows
    starts = view.counts.response_start(list(docs)) if len(docs) else np.zeros(0, np.int64)
    counted = starts >= 0
    if corpus_rows and not counted.all():
      bad = [d for d, c in zip(docs, counted) if not c]
      raise ValueError(f"{len(bad)} record(s) of these rows were not counted in the prior (e.g. "
                       f"{bad[:3]}), so leave-one-out cannot apply: build the prior on their split")
    if not corpus_rows and counted.any():
      bad = [d for d, c in zip(docs, counted) if c]
      raise ValueError(f"{len(bad)} record(s) of these rows were counted in the prior (e.g. "
                       f"{bad[:3]}): query them as corpus rows (leave-one-out), or they are not "
                       "held out")
    self.doc_start = starts if corpus_rows else None

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    view = self.view
    index = response_index(batch, self.doc_start)
    valid = index >= 0
    shape = index.shape
    out = uniform_prior(shape, view.k, view.vocab_size)
    if valid.any():
      hist = histories(batch, index, max(view.order - 1, 0), view.counts.num_ids)
      sparse = view.query(hist[valid], batch["targets"][valid], loo=self.corpus_rows)
      out.ids[valid], out.probs[valid], out.rest[valid] = sparse
    return dict(zip(KEYS, out))
