"""Deterministic, resumable batches of packed rows, each host reading only the rows its devices hold.

Row order: epoch e is a permutation of the rows drawn from (seed, e). The iterator's whole state is
one number, the global position (rows consumed), so it is saved in the checkpoint and a resumed run
continues with exactly the rows it would have seen. Batches run across epoch boundaries.

Which rows of a global batch a host reads comes from the batch sharding itself (`HostSlice`): the
rows held by its addressable devices, whatever the mesh's device order (fsdp or tensor axes may
span hosts). Features computed on the host per batch (e.g. the corpus prior's top-K) are added to
those local rows before they are assembled into global arrays.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Sharding

# A per-batch host feature: local batch (dict of [rows, T, ...]) -> new named arrays.
BatchFeature = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class HostSlice:
  """The rows of a [global_batch, ...] array that this process's devices hold under `sharding`.

  `host_of(device)` and `host` default to the real process index; tests simulate hosts with them.
  """

  def __init__(self, sharding: Sharding, global_batch: int, *, host_of=None, host: int | None = None):
    self.sharding = sharding
    self.global_batch = global_batch
    host_of = host_of or (lambda d: d.process_index)
    host = jax.process_index() if host is None else host
    rows = set()
    for device, index in sharding.devices_indices_map((global_batch, 1)).items():
      if host_of(device) == host:
        rows.update(range(*index[0].indices(global_batch)))
    self.rows = np.asarray(sorted(rows), np.int64)  # global row positions, ascending

  def assemble(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global arrays from this host's rows (local[k][i] is global row self.rows[i])."""
    def build(v):
      def read(index):
        pos = np.searchsorted(self.rows, np.arange(*index[0].indices(self.global_batch)))
        return v[(pos,) + tuple(index[1:])]
      return jax.make_array_from_callback((self.global_batch, *v.shape[1:]), self.sharding, read)
    return {k: build(v) for k, v in local.items()}


class BatchIterator:

  def __init__(self, rows: dict[str, np.ndarray], global_batch: int, seed: int,
               host_rows: Sequence[int] | None = None,
               features: Sequence[BatchFeature] = ()):
    self.rows = rows
    self.num_rows = len(next(iter(rows.values())))
    if self.num_rows == 0:
      raise ValueError("no training rows: the split is empty after tokenisation and truncation")
    self.global_batch = global_batch
    self.seed = seed
    self.host_rows = np.arange(global_batch) if host_rows is None else np.asarray(host_rows)
    self.features = tuple(features)
    self.position = 0
    self._perm_epoch, self._perm = -1, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
      self._perm_epoch = epoch
    return self._perm

  def row_indices(self, positions: np.ndarray) -> np.ndarray:
    """Dataset rows at global stream positions (epoch by epoch)."""
    out = np.empty(len(positions), np.int64)
    for i, p in enumerate(positions):
      epoch, offset = divmod(int(p), self.num_rows)
      out[i] = self._permutation(epoch)[offset]
    return out

  def next_local(self) -> dict[str, np.ndarray]:
    """This host's rows of the next global batch (see HostSlice), with the per-batch features."""
    idx = self.row_indices(self.position + self.host_rows)
    self.position += self.global_batch
    return add_features({k: v[idx] for k, v in self.rows.items()}, self.features)

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


def add_features(local: dict[str, np.ndarray], features: Sequence[BatchFeature]) -> dict:
  for fn in features:
    local = {**local, **fn(local)}
  return local


def local_spec(rows: dict[str, np.ndarray], n: int, features: Sequence[BatchFeature] = ()) -> dict:
  """{name: (row shape, dtype)} of a local batch of `n` rows with the per-batch features: the
  element spec the step is compiled for."""
  sample = add_features({k: v[np.arange(n) % len(v)] for k, v in rows.items()}, features)
  return {k: (v.shape[1:], v.dtype) for k, v in sample.items()}


def fixed_batches(rows: dict[str, np.ndarray], global_batch: int, host_rows: Sequence[int] | None = None,
                  features: Sequence[BatchFeature] = ()) -> list[dict[str, np.ndarray]]:
  """All rows in order as full batches (the last padded with empty rows: segment 0, doc -1), this
  host's rows of each: for evaluation and scoring passes."""
  n = len(next(iter(rows.values())))
  host_rows = np.arange(global_batch) if host_rows is None else np.asarray(host_rows)
  out = []
  for start in range(0, n, global_batch):
    batch = {}
    for k, v in rows.items():
      chunk = v[start:start + global_batch]
      pad = global_batch - len(chunk)
      if pad:
        fill = np.full((pad,) + chunk.shape[1:], -1 if k == "doc" else 0, chunk.dtype)
        chunk = np.concatenate([chunk, fill])
      batch[k] = chunk[host_rows]
    out.append(add_features(batch, features))
  return out
