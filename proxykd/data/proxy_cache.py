"""The offline proxy cache (paper App. A.1): per response position of the distillation split, the
proxy's top-k token ids and log-probabilities and the log of the mass of every other token.

Layout under the cache directory:
- `manifest.json`: the fingerprint the cache was made under (rows: tokenizer, seq_len,
  truncation, length policy; the proxy; k; tau), the number of shards and rows per shard;
- `shard-<s>/`: one directory per block of packed rows, written to a temporary name and renamed
  when complete (a killed run leaves no half shard): `keys.npy` (record index into `docs.json`,
  token offset) [n, 2] int64, `ids.npy` [n, k] int32, `logp.npy` [n, k] float32, `tail.npy` [n]
  float32, `docs.json` (the record ids the shard's keys index), `mean_logp.npy` [len(docs)] (each
  record's mean log-probability of its response tokens under the proxy at temperature 1: the
  sample weights' l_i, Eq. 9).
Positions are keyed by (record id, token offset in the record's tokenisation), so a student's rows
join the cache however they are packed (`CacheFeature`), and a cache made under other rows or
another proxy is refused (proxykd/data/pipeline.py `check_fingerprint`).
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from etils import epath

from proxykd.data import pipeline

MANIFEST = "manifest.json"
ARRAYS = ("keys", "ids", "logp", "tail")


def fingerprint(rows_fingerprint: dict[str, Any], proxy: dict[str, Any], k: int, tau: float
                ) -> dict[str, Any]:
  """What a cache is valid for: the token rows (tokenizer, seq_len, truncation, length policy),
  the proxy's weights (proxykd/models/checkpoint.py `weights_identity`), k and the temperature."""
  return {**rows_fingerprint, "proxy": proxy, "k": int(k), "tau": float(tau)}


def shard_dir(root: epath.PathLike, s: int) -> epath.Path:
  return epath.Path(root) / f"shard-{s:05d}"


def write_manifest(root: epath.PathLike, manifest: dict[str, Any]) -> None:
  root = epath.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def read_manifest(root: epath.PathLike) -> dict[str, Any] | None:
  path = epath.Path(root) / MANIFEST
  return json.loads(path.read_text()) if path.exists() else None


def _save(path: epath.Path, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, array)
  path.write_bytes(buf.getvalue())


def write_shard(root: epath.PathLike, s: int, docs: list[str], keys: np.ndarray, ids: np.ndarray,
                logp: np.ndarray, tail: np.ndarray, mean_logp: np.ndarray) -> int:
  """Write shard s atomically (a temporary directory renamed). -> bytes written."""
  final = shard_dir(root, s)
  tmp = final.parent / f"{final.name}.tmp"
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir(parents=True)
  for name, array in zip(ARRAYS, (keys.astype(np.int64), ids.astype(np.int32),
                                  logp.astype(np.float32), tail.astype(np.float32))):
    _save(tmp / f"{name}.npy", array)
  _save(tmp / "mean_logp.npy", np.asarray(mean_logp, np.float64))
  (tmp / "docs.json").write_text(json.dumps(docs))
  tmp.rename(final)
  return sum((final / f"{n}.npy").stat().length for n in ARRAYS)


def shard_done(root: epath.PathLike, s: int) -> bool:
  return (shard_dir(root, s) / "docs.json").exists()


def read_shard(root: epath.PathLike, s: int) -> tuple[list[str], dict[str, np.ndarray]]:
  d = shard_dir(root, s)
  arrays = {n: np.load(io.BytesIO((d / f"{n}.npy").read_bytes())) for n in ARRAYS + ("mean_logp",)}
  return json.loads((d / "docs.json").read_text()), arrays


class ProxyCache:
  """All shards of a cache in memory, indexed by (record id, offset)."""

  def __init__(self, root: epath.PathLike, expected_fingerprint: dict[str, Any] | None = None):
    self.root = epath.Path(root)
    manifest = read_manifest(self.root)
    if manifest is None:
      raise FileNotFoundError(f"{self.root}: no {MANIFEST}; run the cache_proxy stage first")
    if expected_fingerprint is not None:
      pipeline.check_fingerprint(manifest["fingerprint"], expected_fingerprint,
                                 f"the proxy cache {self.root}")
    missing = [s for s in range(manifest["num_shards"]) if not shard_done(self.root, s)]
    if missing:
      raise FileNotFoundError(f"{self.root}: shards {missing[:5]} are missing; the cache_proxy "
                              "stage did not finish (rerun it to complete the cache)")
    self.k = manifest["fingerprint"]["k"]
    parts, self._where, self._mean_logp = [], {}, {}
    base = 0
    for s in range(manifest["num_shards"]):
      docs, arrays = read_shard(self.root, s)
      self._mean_logp.update(zip(docs, arrays.pop("mean_logp").tolist()))
      keys = arrays["keys"]
      order = np.lexsort((keys[:, 1], keys[:, 0]))
      arrays = {n: a[order] for n, a in arrays.items()}
      keys = arrays["keys"]
      bounds = np.searchsorted(keys[:, 0], np.arange(len(docs) + 1))
      for i, rid in enumerate(docs):
        if bounds[i + 1] > bounds[i]:
          self._where[rid] = (base + bounds[i], base + bounds[i + 1])
      parts.append(arrays)
      base += len(keys)
    self.offsets = np.concatenate([p["keys"][:, 1] for p in parts]) if parts else np.zeros(0, np.int64)
    self.ids = np.concatenate([p["ids"] for p in parts]) if parts else np.zeros((0, self.k), np.int32)
    self.logp = np.concatenate([p["logp"] for p in parts]) if parts else np.zeros((0, self.k), np.float32)
    self.tail = np.concatenate([p["tail"] for p in parts]) if parts else np.zeros(0, np.float32)

  def record_mean_logp(self) -> tuple[list[str], np.ndarray]:
    """(record ids, their mean response log-probability under the proxy): Eq. 9's l_i."""
    ids = sorted(self._mean_logp)
    return ids, np.asarray([self._mean_logp[i] for i in ids])

  def lookup(self, record_id: str, offsets: np.ndarray) -> np.ndarray:
    """Rows of the cache arrays for these offsets of a record (-1 where not cached)."""
    lo, hi = self._where.get(record_id, (0, 0))
    at = lo + np.searchsorted(self.offsets[lo:hi], offsets)
    found = (at < hi) & (self.offsets[np.minimum(at, max(len(self.offsets) - 1, 0))] == offsets) \
        if hi > lo else np.zeros(len(offsets), bool)
    return np.where(found, at, -1)


class CacheFeature:
  """A per-batch host feature (proxykd/data/batches.py) joining a batch's response slots to the
  cache: `proxy_ids` [T, k], `proxy_logp` [T, k] (-inf where uncached), `proxy_tail` [T].
  A response slot the cache lacks is an error naming the record and offset."""

  def __init__(self, cache: ProxyCache, docs: list[str]):
    self.cache, self.docs = cache, docs

  def __call__(self, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    doc, offset, mask = local["doc"], local["offset"], local["loss_mask"] > 0
    n, t = doc.shape
    k = self.cache.k
    where = np.full((n, t), -1, np.int64)
    for d in np.unique(doc[mask]):
      sel = mask & (doc == d)
      rid = self.docs[d]
      found = self.cache.lookup(rid, offset[sel].astype(np.int64))
      if (found < 0).any():
        bad = offset[sel][found < 0][0]
        raise ValueError(f"the proxy cache {self.cache.root} has no entry for record {rid!r} "
                         f"offset {int(bad)}; it was made for other rows (rebuild it)")
      where[sel] = found
    hit = where >= 0
    ids = np.zeros((n, t, k), np.int32)
    logp = np.full((n, t, k), -np.inf, np.float32)
    tail = np.full((n, t), -np.inf, np.float32)
    ids[hit], logp[hit], tail[hit] = self.cache.ids[where[hit]], self.cache.logp[where[hit]], \
        self.cache.tail[where[hit]]
    return {"proxy_ids": ids, "proxy_logp": logp, "proxy_tail": tail}
