"""Pack token sequences into fixed-length rows with segment ids and positions.

A document of n tokens fills n - 1 slots of a row: `inputs` = ids[:-1], `targets` = ids[1:],
`loss_mask` = the target's mask. Documents in one row get segment ids 1, 2, ... and positions
restarting at 0; the model attends only within a segment, so packed documents never see each other.
Padding has segment id 0 and no loss.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from proxykd.data.tokenize import Example

ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def empty_rows(n: int, seq_len: int) -> dict[str, np.ndarray]:
  return {k: np.zeros((n, seq_len), np.int32) for k in ROW_KEYS}


def pack(examples: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
  """Greedy packing in the given order: a document goes into the current row if it fits, else it
  starts a new one. Every example must have at most seq_len + 1 tokens (see tokenize.truncate)."""
  rows: list[list[Example]] = []
  used = seq_len + 1  # Forces a new row for the first document.
  for ex in examples:
    n = len(ex.ids) - 1
    if n > seq_len:
      raise ValueError(f"example {ex.id!r} has {len(ex.ids)} tokens, more than seq_len + 1 = "
                       f"{seq_len + 1}; truncate first")
    if n < 1:
      continue
    if used + n > seq_len:
      rows.append([])
      used = 0
    rows[-1].append(ex)
    used += n
  out = empty_rows(len(rows), seq_len)
  for r, docs in enumerate(rows):
    at = 0
    for seg, ex in enumerate(docs, start=1):
      n = len(ex.ids) - 1
      sl = slice(at, at + n)
      out["inputs"][r, sl] = ex.ids[:-1]
      out["targets"][r, sl] = ex.ids[1:]
      out["positions"][r, sl] = np.arange(n)
      out["segment_ids"][r, sl] = seg
      out["loss_mask"][r, sl] = ex.loss_mask[1:]
      at += n
  return out
