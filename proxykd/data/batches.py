"""Deterministic, resumable batches of packed rows, sharded per host, as global jax Arrays.

Row order: epoch e is a permutation of the rows drawn from (seed, e). The iterator's whole state is
one number, the global position (rows consumed), so it is saved in the checkpoint and a resumed run
continues with exactly the rows it would have seen. Batches run across epoch boundaries.
On multi-host runs each process builds only its slice of the global batch and
`jax.make_array_from_process_local_data` assembles the global array.
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from proxykd.train import sharding as shd


class BatchIterator:

  def __init__(self, rows: dict[str, np.ndarray], global_batch: int, seed: int,
               process_index: int | None = None, process_count: int | None = None):
    self.rows = rows
    self.num_rows = len(next(iter(rows.values())))
    if self.num_rows == 0:
      raise ValueError("no training rows: the split is empty after tokenisation and truncation")
    self.global_batch = global_batch
    self.seed = seed
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch % self.process_count:
      raise ValueError(f"batch size {global_batch} does not divide over {self.process_count} hosts")
    self.position = 0
    self._perm_epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
      self._perm_epoch = epoch
    return self._perm

  def row_indices(self, start: int, count: int) -> np.ndarray:
    out = np.empty(count, np.int64)
    for i in range(count):
      epoch, offset = divmod(start + i, self.num_rows)
      out[i] = self._permutation(epoch)[offset]
    return out

  def next_local(self) -> dict[str, np.ndarray]:
    """This host's rows of the next global batch."""
    per_host = self.global_batch // self.process_count
    idx = self.row_indices(self.position + self.process_index * per_host, per_host)
    self.position += self.global_batch
    return {k: v[idx] for k, v in self.rows.items()}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    while True:
      yield self.next_local()

  @property
  def epoch(self) -> float:
    return self.position / self.num_rows

  def state(self) -> dict:
    return {"position": int(self.position), "num_rows": int(self.num_rows), "seed": int(self.seed),
            "global_batch": int(self.global_batch)}

  def restore(self, state: dict) -> None:
    if state.get("num_rows") != self.num_rows or state.get("seed") != self.seed:
      raise ValueError(
          f"the checkpoint's data position was saved for {state.get('num_rows')} rows with seed "
          f"{state.get('seed')}, but the data now has {self.num_rows} rows with seed {self.seed}; "
          "the corpus, split, tokenizer, seq_len or seed changed since the run started")
    self.position = int(state["position"])


def to_global(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble the global batch arrays (rows over data x fsdp) from each host's rows."""
  sharding = shd.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def fixed_batches(rows: dict[str, np.ndarray], global_batch: int
                  ) -> list[dict[str, np.ndarray]]:
  """All rows in order as full batches (the last padded with empty rows), this host's slice of
  each: for evaluation."""
  n = len(next(iter(rows.values())))
  per_host = global_batch // jax.process_count()
  lo = jax.process_index() * per_host
  out = []
  for start in range(0, n, global_batch):
    batch = {}
    for k, v in rows.items():
      chunk = v[start:start + global_batch]
      pad = global_batch - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      batch[k] = chunk[lo:lo + per_host]
    out.append(batch)
  return out
