"""Records -> packed rows: tokenise with the chat template, truncate, shuffle by seed, pack."""
from __future__ import annotations

from typing import Sequence

import ml_collections
import numpy as np

from proxykd.data import packing, tokenize


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seq_len=512,
      truncation="truncate_response",  # drop | truncate_response | truncate_prompt
      seed=0,  # shuffles documents before packing and rows every epoch
  ))


def build_rows(records: Sequence[dict], tokenizer, seq_len: int, truncation: str, seed: int,
               shuffle: bool = True) -> tuple[dict[str, np.ndarray], tokenize.TruncationStats]:
  """Packed rows of `records` (documents shuffled by `seed` first) and the truncation counts."""
  examples = tokenize.tokenize(records, tokenizer)
  examples, stats = tokenize.truncate(examples, seq_len + 1, truncation)
  if shuffle:
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(examples))
    examples = [examples[i] for i in order]
  return packing.pack(examples, seq_len), stats
