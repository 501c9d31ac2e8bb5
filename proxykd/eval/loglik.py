"""Log-likelihood of responses under a model: per token and per record, joined back in input order.

Records (`messages` + `response`) are rendered and tokenised exactly as training tokenises them
(proxykd/data/tokenize.py: the chat template, the response mask from character offsets), packed
into rows, and scored by the caller's `score_rows(rows) -> {"logp": [N, T], ...}` (the jitted
scorer on the mesh, proxykd/train/scoring.py, bound to the model's parameters). Every packed slot
knows its record and token offset, so each response token's log-probability is joined back to the
token it scores, in input order.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from proxykd.data import packing, tokenize

ScoreRows = Callable[[packing.Rows], dict[str, np.ndarray]]


@dataclasses.dataclass
class Scored:
  """One record's response tokens: ids, log-probabilities, whether each was the model's argmax,
  their text (the characters each token covers in the rendered conversation; tokens that split
  one character share it), and whether the record was cut to fit (`cut_prompt` tokens of prompt
  removed from its start, `cut_response` from its end)."""
  token_ids: list[int]
  logprobs: list[float]
  top1: list[bool]
  tokens: list[str]
  cut_prompt: int = 0
  cut_response: int = 0

  @property
  def sum_logprob(self) -> float:
    return float(np.sum(self.logprobs, dtype=np.float64))

  @property
  def num_tokens(self) -> int:
    return len(self.token_ids)


def _token_texts(records: Sequence[dict], tokenizer, length_policy: str) -> list[list[str]]:
  """Per record, the text of each token of its rendered conversation (by character offsets)."""
  rendered = [tokenize.render(r, tokenizer, length_policy)[0] for r in records]
  enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
  return [[text[s:e] for s, e in offsets] for text, offsets in zip(rendered, enc["offset_mapping"])]


def response_logprobs(records: Sequence[dict], tokenizer, score_rows: ScoreRows, *, seq_len: int,
                      truncation: str = "truncate_prompt", length_policy: str = "no_eos"
                      ) -> list[Scored | None]:
  """Per record (in order), its scored response tokens; None for a record left without any
  response token (empty, or dropped by `truncation="drop"`).

  Records are identified by position (their `id`s may repeat). A response ends with the chat
  template's end-of-turn token unless the record's `finish_reason` is "length" (length_policy
  no_eos), as in training.
  """
  keyed = [{**r, "id": str(i)} for i, r in enumerate(records)]
  full, _ = tokenize.tokenize(keyed, tokenizer, length_policy)
  n_full = {e.id: len(e.ids) for e in full}
  examples, _ = tokenize.truncate(full, seq_len + 1, truncation)
  out: list[Scored | None] = [None] * len(records)
  if not examples:
    return out
  rows = packing.pack(examples, seq_len)
  scores = score_rows(rows)
  a = rows.arrays
  mask = a["loss_mask"].astype(bool) & (a["doc"] >= 0)
  doc, offset = a["doc"][mask], a["offset"][mask]
  logp, target = scores["logp"][mask], a["targets"][mask]
  top1 = scores["top1"][mask] if "top1" in scores else np.zeros_like(logp, bool)
  record_of_doc = np.asarray([int(d) for d in rows.docs])
  rec = record_of_doc[doc]
  order = np.lexsort((offset, rec))
  rec, offset, logp, target, top1 = rec[order], offset[order], logp[order], target[order], top1[order]
  bounds = np.searchsorted(rec, np.arange(len(records) + 1))
  texts = _token_texts([keyed[i] for i in sorted(set(rec.tolist()))], tokenizer, length_policy)
  text_of = dict(zip(sorted(set(rec.tolist())), texts))
  starts = {int(e.id): e.start for e in examples}
  ends = {int(e.id): e.start + len(e.ids) for e in examples}
  for i in range(len(records)):
    lo, hi = bounds[i], bounds[i + 1]
    if lo == hi:
      continue
    offs = offset[lo:hi]
    out[i] = Scored(target[lo:hi].tolist(), logp[lo:hi].astype(float).tolist(),
                    top1[lo:hi].astype(bool).tolist(), [text_of[i][o] for o in offs],
                    cut_prompt=starts[i], cut_response=n_full[str(i)] - ends[i])
  return out
