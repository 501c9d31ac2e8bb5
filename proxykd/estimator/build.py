"""Records -> the n-gram counts of their response tokens (tokenised as the training rows are)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from proxykd.data import tokenize
from proxykd.estimator.ngram import Counts, build_counts


def response_tokens(records: Sequence[dict], tokenizer, length_policy: str = "no_eos",
                    chunk: int = 2048, progress: Callable[[int], None] | None = None
                    ) -> tuple[list[np.ndarray], list[str], list[int]]:
  """(response token ids, record ids, index of the first response token in the record's full
  tokenisation) of every record with a response, tokenised with the chat template exactly as the
  training rows are (proxykd/data/tokenize.py), `chunk` records per tokenizer call."""
  responses, ids, starts = [], [], []
  for lo in range(0, len(records), chunk):
    examples, _ = tokenize.tokenize(records[lo:lo + chunk], tokenizer, length_policy)
    for ex in examples:
      mask = np.asarray(ex.loss_mask, bool)
      if not mask.any():
        continue
      first = int(np.argmax(mask))
      responses.append(np.asarray(ex.ids[first:][mask[first:]], np.int32))
      ids.append(ex.id)
      starts.append(first)
    if progress:
      progress(min(chunk, len(records) - lo))
  return responses, ids, starts


def counts_from_records(records: Sequence[dict], tokenizer, max_order: int,
                        length_policy: str = "no_eos", progress=None, log=None) -> Counts:
  """The counts of orders 1..max_order over the records' response tokens."""
  responses, ids, starts = response_tokens(records, tokenizer, length_policy, progress=progress)
  return build_counts(responses, ids, starts, len(tokenizer), max_order, progress=log)
