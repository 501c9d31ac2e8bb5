"""Pack token sequences into fixed-length rows with segment ids, positions, features and identity.

A document of n tokens fills n - 1 slots of a row: `inputs` = ids[:-1], `targets` = ids[1:],
`loss_mask` = the target's mask. Documents in one row get segment ids 1, 2, ... and positions
restarting at 0; the model attends only within a segment, so packed documents never see each other.
Padding has segment id 0 and no loss.

Every slot also knows where its target token came from: `doc` (the index of the document's record
id in `Rows.docs`, -1 on padding) and `offset` (the target's index in the record's full
tokenisation), so per-position artefacts (an offline proxy top-k cache, a prior lookup) join to a
row deterministically. Per-token features of the examples (`Example.features`) are packed the same
way as the loss mask: the entry of token j sits at the slot whose target is token j; padding is 0.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np

from proxykd.data.tokenize import Example

ROW_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "doc", "offset")
# Units of packing: an example, or a group of examples that must share one row (in this order).
Unit = Union[Example, Sequence[Example]]


@dataclasses.dataclass
class Rows:
  """Packed rows: named arrays [num_rows, seq_len, ...] and the record ids `doc` indexes."""
  arrays: dict[str, np.ndarray]
  docs: list[str]

  def __len__(self) -> int:
    return len(self.arrays["inputs"])

  @property
  def seq_len(self) -> int:
    return self.arrays["inputs"].shape[1]

  def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape of one row, dtype)}: what a batch of these rows holds."""
    return {k: (v.shape[1:], v.dtype) for k, v in self.arrays.items()}


def empty_rows(n: int, seq_len: int, feature_spec: dict | None = None) -> dict[str, np.ndarray]:
  out = {k: np.zeros((n, seq_len), np.int32) for k in ROW_KEYS}
  out["doc"][:] = -1
  for name, (shape, dtype) in (feature_spec or {}).items():
    out[name] = np.zeros((n, seq_len, *shape), dtype)
  return out


def _group(unit: Unit) -> list[Example]:
  return [unit] if isinstance(unit, Example) else list(unit)


def _feature_spec(groups: list[list[Example]]) -> dict:
  spec = {}
  for ex in (e for g in groups for e in g):
    for name, v in ex.features.items():
      s = (v.shape[1:], v.dtype)
      if spec.setdefault(name, s) != s:
        raise ValueError(f"feature {name!r}: example {ex.id!r} has per-token shape {s[0]} "
                         f"{s[1]}, earlier ones {spec[name][0]} {spec[name][1]}")
  for ex in (e for g in groups for e in g):
    missing = sorted(set(spec) - set(ex.features))
    if missing:
      raise ValueError(f"example {ex.id!r} lacks the features {missing} that others have")
  return spec


def pack(units: Sequence[Unit], seq_len: int) -> Rows:
  """Greedy packing in the given order: a unit goes into the current row if it fits, else it
  starts a new one. Every example must have at most seq_len + 1 tokens (see tokenize.truncate);
  a group must fit one row as a whole."""
  groups = [g for g in map(_group, units) if sum(len(e.ids) - 1 for e in g) > 0]
  placed: list[list[Example]] = []
  used = seq_len + 1  # Forces a new row for the first unit.
  for g in groups:
    n = sum(max(len(e.ids) - 1, 0) for e in g)
    if n > seq_len:
      raise ValueError(f"example(s) {[e.id for e in g]} need {n} slots, more than seq_len = "
                       f"{seq_len}; truncate first")
    if used + n > seq_len:
      placed.append([])
      used = 0
    placed[-1].extend(e for e in g if len(e.ids) > 1)
    used += n
  out = empty_rows(len(placed), seq_len, _feature_spec(groups))
  docs: list[str] = []
  for r, row in enumerate(placed):
    at = 0
    for seg, ex in enumerate(row, start=1):
      n = len(ex.ids) - 1
      sl = slice(at, at + n)
      out["inputs"][r, sl] = ex.ids[:-1]
      out["targets"][r, sl] = ex.ids[1:]
      out["positions"][r, sl] = np.arange(n)
      out["segment_ids"][r, sl] = seg
      out["loss_mask"][r, sl] = ex.loss_mask[1:]
      out["doc"][r, sl] = len(docs)
      out["offset"][r, sl] = ex.start + np.arange(1, n + 1)
      for name, v in ex.features.items():
        out[name][r, sl] = v[1:]
      docs.append(ex.id)
      at += n
  return Rows(out, docs)
