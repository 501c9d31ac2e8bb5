"""N-gram counts of the teacher's responses: the statistic the corpus prior is computed from.

Built once, vectorised: each response is prefixed with N-1 BOS symbols (id `num_ids`, one past the
tokenizer's ids), so every response token has a full history of N-1 symbols and no history crosses
two responses. For order n (1..N) a position's CONTEXT is its n-1 previous symbols, packed into one
uint64 key (oldest symbol in the highest bits) when (n-1) x bits fits 64 bits, else hashed
(splitmix64 over the symbols: distinct contexts may then collide, with probability ~ contexts^2 /
2^65). Counting is np.unique over integer keys (sorting), never a Python loop or dict per n-gram.

Per order the result is a CSR table: contexts sorted by key, each with its entries (the tokens
that followed it, sorted by id) and their counts, plus suffix pointers (context -> the context
one symbol shorter, entry (h, w) -> entry (suffix(h), w)) that the query uses to walk from the
longest context down to the unigram. Every entry's suffix entry exists: an n-gram seen in the
corpus implies its shorter suffixes were seen at the same position.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Callable, Sequence

import numpy as np
from etils import epath

FORMAT_VERSION = 1
_MIX1, _MIX2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), \
    np.uint64(0x9E3779B97F4A7C15)


def symbol_bits(num_ids: int) -> int:
  """Bits per packed symbol: ids 0..num_ids-1 and BOS = num_ids."""
  return max(1, int(num_ids).bit_length())


def exact_context(order: int, bits: int) -> bool:
  """Whether contexts of `order` pack exactly into 64 bits (else they are hashed)."""
  return (order - 1) * bits <= 64


def _splitmix(x: np.ndarray) -> np.ndarray:
  x = (x ^ (x >> np.uint64(30))) * _MIX1
  x = (x ^ (x >> np.uint64(27))) * _MIX2
  return x ^ (x >> np.uint64(31))


def context_keys(history: np.ndarray, order: int, bits: int) -> np.ndarray:
  """uint64 keys of the contexts of `order` from histories [P, >= order-1] (oldest first, the last
  column the symbol right before the predicted token). Order 1 has the single empty context, 0."""
  p = history.shape[0]
  if order == 1:
    return np.zeros(p, np.uint64)
  cols = history[:, history.shape[1] - (order - 1):].astype(np.uint64)
  with np.errstate(over="ignore"):
    if exact_context(order, bits):
      key = np.zeros(p, np.uint64)
      for j in range(order - 1):
        key = (key << np.uint64(bits)) | cols[:, j]
      return key
    key = np.full(p, np.uint64(order) * _GOLDEN, np.uint64)
    for j in range(order - 1):
      key = _splitmix(key ^ (cols[:, j] + _GOLDEN))
    return key


@dataclasses.dataclass
class OrderCounts:
  """The counts of one order n. Contexts are sorted by key; the entries of context c are
  [start[c], start[c + 1]), sorted by token id."""
  ctx_keys: np.ndarray  # uint64 [C]
  start: np.ndarray  # int64 [C + 1]
  total: np.ndarray  # int64 [C]: occurrences of the context (sum of its entries' counts)
  ctx_sfx: np.ndarray  # int32 [C]: index of the suffix context at order n-1 (-1 at order 1)
  tok: np.ndarray  # int32 [E]
  cnt: np.ndarray  # int64 [E]
  sfx: np.ndarray  # int32 [E]: index of entry (suffix context, tok) at order n-1 (-1 at order 1)

  @property
  def distinct(self) -> np.ndarray:
    """N1+(h .): how many different tokens followed each context."""
    return np.diff(self.start)

  @property
  def entry_ctx(self) -> np.ndarray:
    return np.repeat(np.arange(len(self.ctx_keys), dtype=np.int64), self.distinct)


@dataclasses.dataclass
class Counts:
  """Counts of orders 1..max_order over the response tokens of a corpus, and which records (and
  where each one's response starts in its full tokenisation) were counted, for leave-one-out."""
  orders: list[OrderCounts]  # orders[n - 1] is order n
  num_ids: int  # token ids are 0..num_ids-1; BOS = num_ids
  num_tokens: int
  record_keys: np.ndarray  # uint64 [R] sorted: record_key(id) of every counted record
  record_start: np.ndarray  # int64 [R]: index of the record's first response token
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def max_order(self) -> int:
    return len(self.orders)

  @property
  def bits(self) -> int:
    return symbol_bits(self.num_ids)

  def response_start(self, record_ids: Sequence[str]) -> np.ndarray:
    """Response start of each record (-1 for records that were not counted)."""
    keys = record_keys(record_ids)
    pos = np.minimum(np.searchsorted(self.record_keys, keys), max(len(self.record_keys) - 1, 0))
    found = (self.record_keys[pos] == keys) if len(self.record_keys) else np.zeros(len(keys), bool)
    return np.where(found, self.record_start[pos] if len(self.record_keys) else -1, -1)

  # ------------------------------------------------------------------------------ save / load
  def save(self, path: epath.PathLike) -> None:
    """One uncompressed .npz, written atomically (a temporary file, then a rename)."""
    arrays = {"record_keys": self.record_keys, "record_start": self.record_start}
    for n, o in enumerate(self.orders, start=1):
      for f in dataclasses.fields(OrderCounts):
        arrays[f"o{n}/{f.name}"] = getattr(o, f.name)
    info = {"version": FORMAT_VERSION, "num_ids": self.num_ids, "num_tokens": self.num_tokens,
            "max_order": self.max_order, "meta": self.meta}
    buf = io.BytesIO()
    np.savez(buf, info=np.asarray(json.dumps(info)), **arrays)
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp"
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)

  @classmethod
  def load(cls, path: epath.PathLike) -> "Counts":
    path = epath.Path(path)
    with np.load(io.BytesIO(path.read_bytes())) as z:
      info = json.loads(str(z["info"]))
      if info.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: prior format version {info.get('version')}, this code reads "
                         f"{FORMAT_VERSION}; rebuild the prior")
      orders = [OrderCounts(**{f.name: z[f"o{n}/{f.name}"] for f in dataclasses.fields(OrderCounts)})
                for n in range(1, info["max_order"] + 1)]
      return cls(orders, info["num_ids"], info["num_tokens"], z["record_keys"], z["record_start"],
                 info.get("meta", {}))

  def nbytes(self) -> int:
    return sum(getattr(o, f.name).nbytes for o in self.orders for f in dataclasses.fields(OrderCounts))


def record_keys(record_ids: Sequence[str]) -> np.ndarray:
  """uint64 hashes of record ids (the first 8 bytes of sha256)."""
  return np.asarray([int.from_bytes(hashlib.sha256(r.encode("utf-8")).digest()[:8], "big")
                     for r in record_ids], np.uint64).reshape(-1)


def _stream(responses: Sequence[np.ndarray], pad: int, bos: int) -> tuple[np.ndarray, np.ndarray]:
  """All responses in one array, each preceded by `pad` BOS symbols -> (stream, token positions)."""
  lengths = np.asarray([len(r) for r in responses], np.int64)
  first = np.cumsum(lengths + pad) - lengths  # where each response's first token sits
  stream = np.full(int((lengths + pad).sum()), bos, np.int64)
  within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  pos = np.repeat(first, lengths) + within
  if len(pos):
    stream[pos] = np.concatenate([np.asarray(r, np.int64) for r in responses])
  return stream, pos


def _order_counts(stream: np.ndarray, pos: np.ndarray, n: int, bits: int,
                  lower: tuple[OrderCounts, np.ndarray] | None) -> tuple[OrderCounts, np.ndarray]:
  """Order n's table and the entry index of every position (for the next order's suffix pointers).

  Suffix pointers come from the positions: the entry a position counts at order n has as suffix
  the entry the same position counts at order n - 1 (scattered, no search).
  """
  tok = stream[pos]
  if n == 1:
    cnt_all = np.bincount(tok)
    etok = np.flatnonzero(cnt_all).astype(np.int32)
    index = np.zeros(len(cnt_all), np.int64)
    index[etok] = np.arange(len(etok))
    table = OrderCounts(np.zeros(1, np.uint64), np.array([0, len(etok)], np.int64),
                        np.array([len(pos)], np.int64), np.full(1, -1, np.int32), etok,
                        cnt_all[etok].astype(np.int64), np.full(len(etok), -1, np.int32))
    return table, index[tok]
  hist = np.stack([stream[pos - j] for j in range(n - 1, 0, -1)], 1)
  keys = context_keys(hist, n, bits)
  del hist
  utok = tok.astype(np.uint64)
  if exact_context(n + 1, bits):  # (context, token) packs into one uint64: one sort.
    pair, inv, cnt = np.unique((keys << np.uint64(bits)) | utok, return_inverse=True,
                               return_counts=True)
    ekey = pair >> np.uint64(bits)
    new = np.ones(len(pair), bool)
    new[1:] = ekey[1:] != ekey[:-1]
    ctx_keys = ekey[new]
    ectx = np.cumsum(new) - 1
  else:  # Contexts to dense indices first, then (index, token) pairs.
    ctx_keys, cinv = np.unique(keys, return_inverse=True)
    pair, inv, cnt = np.unique((cinv.astype(np.uint64) << np.uint64(bits)) | utok,
                               return_inverse=True, return_counts=True)
    ectx = (pair >> np.uint64(bits)).astype(np.int64)
  etok = (pair & np.uint64((1 << bits) - 1)).astype(np.int32)
  num_ctx = len(ctx_keys)
  start = np.zeros(num_ctx + 1, np.int64)
  np.cumsum(np.bincount(ectx, minlength=num_ctx), out=start[1:])
  total = np.add.reduceat(cnt, start[:-1]).astype(np.int64) if len(cnt) else np.zeros(0, np.int64)
  low, low_index = lower
  sfx = np.empty(len(etok), np.int32)
  sfx[inv] = low_index
  ctx_sfx = np.empty(num_ctx, np.int32)
  ctx_sfx[ectx] = low.entry_ctx[sfx] if n > 2 else 0
  return OrderCounts(ctx_keys, start, total, ctx_sfx, etok, cnt.astype(np.int64), sfx), inv


def build_counts(responses: Sequence[np.ndarray], record_ids: Sequence[str],
                 response_starts: Sequence[int], num_ids: int, max_order: int,
                 progress: Callable[[str], None] | None = None) -> Counts:
  """Count orders 1..max_order over `responses` (token id arrays, one per record).

  `record_ids` / `response_starts`: each record's id and the index of its first response token in
  its full tokenisation (prompt included), so that a query can find a packed row's history and
  leave its own occurrence out.
  """
  if max_order < 1:
    raise ValueError(f"max_order must be >= 1, got {max_order}")
  if len(responses) != len(record_ids) or len(responses) != len(response_starts):
    raise ValueError("responses, record_ids and response_starts differ in length")
  bits = symbol_bits(num_ids)
  stream, pos = _stream(responses, max_order - 1, num_ids)
  if len(pos) and (stream[pos].min() < 0 or stream[pos].max() >= num_ids):
    raise ValueError(f"token ids must lie in [0, {num_ids}), got [{stream[pos].min()}, "
                     f"{stream[pos].max()}]")
  orders: list[OrderCounts] = []
  index = None
  for n in range(1, max_order + 1):
    table, index = _order_counts(stream, pos, n, bits, (orders[-1], index) if orders else None)
    orders.append(table)
    if progress:
      progress(f"order {n}: {len(orders[-1].ctx_keys)} contexts, {len(orders[-1].tok)} n-grams")
  keys = record_keys(record_ids)
  order = np.argsort(keys, kind="stable")
  if len(keys) and np.any(keys[order][1:] == keys[order][:-1]):
    raise ValueError("record ids are not unique")
  return Counts(orders, int(num_ids), int(len(pos)), keys[order],
                np.asarray(response_starts, np.int64).reshape(-1)[order])
