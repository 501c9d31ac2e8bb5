"""The corpus prior pi_t of METHOD.md Stage 2: an interpolated n-gram next-token distribution over
the teacher's response tokens, queried for whole batches of positions with leave-one-out.

Model (orders 1..N, uniform order 0). For a context h of order n with count C(h) = sum_w c(h, w)
and N1+(h .) distinct continuations:
  Witten-Bell:            p_n(w|h) = (c(h,w) + N1+ p_{n-1}(w|h')) / (C + N1+)
  absolute discounting:   p_n(w|h) = max(c(h,w) - D, 0) / C + (D N1+ / C) p_{n-1}(w|h')
  an unseen context (C = 0) passes p_{n-1} through; p_0 = 1/V;
  pi(w) = (1 - eps) p_N(w|h_N) + eps / V            (the uniform floor)
h' is h without its oldest symbol. D is fixed or, per order, n1 / (n1 + 2 n2) (count-of-counts).

Leave-one-out (`loo`): at a position of the corpus the prior was counted on, this occurrence of
(h_n, y) is removed from every order's counts before the formulas above: c(h_n, y) - 1, C - 1, and
N1+ - 1 where c(h_n, y) was 1. The prior then never contains the label it is asked about.

What a query returns (SparsePrior): the K most probable tokens with their exact probabilities, and
`rest`, the probability of EVERY other token: the remaining mass 1 - sum(top K) spread uniformly over
the V - K others. That truncated pi is a proper distribution over the full vocabulary by
construction; it is the pi the posterior kernel reads (the mass below the top K is smoothed out).

How the top K is found fast (the query is on the data pipeline's hot path). Expanding the
recursion, p_N(w) = sum_n beta_n (c_n(w) - D_n) [c_n(w) > 0] + B_0 / V, where the per-position
coefficients beta_n = a_n prod_{j > n} b_j depend only on the position's context counts. The view
keeps candidate LISTS of K + 1 tokens: for each order-2 context the top of p_2 over every token (its
continuations merged with the unigram back-off; there are at most V such contexts), for each longer
context its own continuations ranked by p_n(w|h); each entry with its counts along the suffix chain
(c_1..c_n) and its rank in each shorter context's list. A query gathers the lists of the position's
contexts, drops a token's copies in shorter lists when a longer one holds it, evaluates the exact
(LOO) probability of every candidate from its counts, and keeps the K best. Without leave-one-out
this top K is exact: a token missing from the list of its longest context is outranked there by K +
1 tokens whose final probabilities are at least as large (the terms of longer orders are
non-negative). With leave-one-out the lists are the full corpus's; the extra slot covers the label
dropping out of a list, but a token whose LOO probability overtakes the last of a list through the
re-weighting of orders could be missed, in which case it gets `rest` like any token outside the top
K (pi stays proper; the probabilities returned are always exact).
"""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import numpy as np

from proxykd.estimator.ngram import Counts, context_keys

_NO_RANK = np.iinfo(np.int16).max


@dataclasses.dataclass(frozen=True)
class Smoothing:
  """Interpolation: Witten-Bell ("wb"), or absolute discounting with a fixed D ("abs:0.75") or the
  per-order estimate D = n1 / (n1 + 2 n2) ("abs")."""
  kind: str
  discount: float | None = None

  @classmethod
  def parse(cls, spec: "str | Smoothing") -> "Smoothing":
    if isinstance(spec, Smoothing):
      return spec
    text = str(spec).strip().lower()
    if text in ("wb", "witten_bell", "witten-bell"):
      return cls("wb")
    m = re.fullmatch(r"abs(?::([0-9.eE+-]+))?", text)
    if m:
      d = float(m.group(1)) if m.group(1) else None
      if d is not None and not 0 < d <= 1:
        raise ValueError(f"smoothing {spec!r}: the absolute discount must lie in (0, 1]")
      return cls("abs", d)
    raise ValueError(f"smoothing {spec!r}: use 'wb' (Witten-Bell), 'abs' (absolute discounting, "
                     "D per order from count-of-counts) or 'abs:D' with D in (0, 1]")

  def __str__(self) -> str:
    return "wb" if self.kind == "wb" else ("abs" if self.discount is None else f"abs:{self.discount:g}")


class SparsePrior(NamedTuple):
  """pi over the full vocabulary: pi(ids[..., k]) = probs[..., k]; pi(w) = rest for every other w."""
  ids: np.ndarray  # int32 [..., K], distinct per position
  probs: np.ndarray  # float32 [..., K]
  rest: np.ndarray  # float32 [...]


def uniform_prior(shape: tuple[int, ...], k: int, vocab_size: int) -> SparsePrior:
  """The uniform distribution in the sparse form (for positions with nothing to predict)."""
  ids = np.broadcast_to(np.arange(k, dtype=np.int32), (*shape, k)).copy()
  return SparsePrior(ids, np.full((*shape, k), 1.0 / vocab_size, np.float32),
                     np.full(shape, 1.0 / vocab_size, np.float32))


@dataclasses.dataclass
class _Lists:
  """The ranked candidate list of every context of one order (CSR; per-order columns stored
  separately, so a query gathers each with one np.take)."""
  start: np.ndarray  # int64 [C + 1]
  tok: np.ndarray  # int32 [L]
  excess: np.ndarray  # float32 [n, L]: c(h_m, tok) - D_m where the count is > 0, else 0; m = 1..n
  rank: np.ndarray  # int16 [n - 2, L]: rank of (h_m, tok) in h_m's list, m = 2..n-1 (or _NO_RANK)


class PriorView:
  """The prior of one setting (order, smoothing, floor, vocabulary, K) over `counts`, ready to query.

  `vocab_size` is the model's vocabulary (>= the tokenizer's ids; ids past them are never seen and
  get floor and back-off mass like any unseen token). Lists: order 1 has one, over every id; each
  order-2 context has the top K + 1 of p_2 over EVERY token (its continuations merged with the
  unigram back-off: there are at most V such contexts), plus one extra list, the unigram one, for
  positions whose order-2 context is unseen; orders >= 3 list their own continuations.
  """

  def __init__(self, counts: Counts, *, order: int, smoothing: "str | Smoothing" = "wb",
               k: int = 32, vocab_size: int | None = None, floor: float = 1e-6):
    vocab_size = int(vocab_size or counts.num_ids)
    if not 1 <= order <= counts.max_order:
      raise ValueError(f"order {order}: the prior was counted up to order {counts.max_order}")
    if vocab_size < counts.num_ids:
      raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {counts.num_ids} ids")
    if not 1 <= k <= min(vocab_size, 4096):
      raise ValueError(f"k={k} must lie in [1, min(vocab_size, 4096)]")
    if not 0 <= floor < 1:
      raise ValueError(f"floor={floor} must lie in [0, 1)")
    if counts.num_tokens == 0:
      raise ValueError("the prior was counted on no tokens")
    self.counts, self.order, self.k, self.vocab_size, self.floor = counts, order, k, vocab_size, floor
    self.smoothing = Smoothing.parse(smoothing)
    self.list_len = min(k + 1, vocab_size)
    tables = counts.orders[:order]
    self.discounts = np.array([0.0] + [self._discount(t) for t in tables])  # [order + 1]
    self._totals = [t.total.astype(np.float64) for t in tables]
    self._distinct = [t.distinct.astype(np.float64) for t in tables]
    self._build_lists()

  # ------------------------------------------------------------------------------------ build
  def _discount(self, table) -> float:
    if self.smoothing.kind == "wb":
      return 0.0
    if self.smoothing.discount is not None:
      return float(self.smoothing.discount)
    n1, n2 = int(np.sum(table.cnt == 1)), int(np.sum(table.cnt == 2))
    return float(np.clip(n1 / (n1 + 2 * n2), 0.05, 1.0)) if n1 + 2 * n2 else 0.5

  def _weights(self, total: np.ndarray, distinct: np.ndarray, d):
    """(a, b): p_n(w) = a (c(w) - d) + b p_{n-1}(w); an unseen context (total 0): a = 0, b = 1."""
    seen = total > 0
    safe_t = np.where(seen, total, 1.0)
    if self.smoothing.kind == "wb":
      den = np.where(seen, total + distinct, 1.0)
      a, b = 1.0 / den, distinct / den
    else:
      a, b = 1.0 / safe_t, d * distinct / safe_t
    return np.where(seen, a, 0.0), np.where(seen, b, 1.0)

  def _excess(self, cnt: np.ndarray, n: int) -> np.ndarray:
    return np.where(cnt > 0, cnt - self.discounts[n], 0.0)

  def _build_lists(self) -> None:
    c = self.counts
    v, lk = self.vocab_size, self.list_len
    t1 = c.orders[0]
    a1, b1 = (x[0] for x in self._weights(self._totals[0], self._distinct[0], self.discounts[1]))
    prob1 = np.full(v, b1 / v)  # p_1 of every id (unseen ones: back-off mass only)
    prob1[t1.tok] += a1 * (t1.cnt - self.discounts[1])
    uni = np.lexsort((np.arange(v), -prob1))[:lk]  # ties: lower id first
    cnt1 = np.zeros(v)
    cnt1[t1.tok] = t1.cnt
    unigram = _Lists(np.array([0, lk]), uni.astype(np.int32),
                     self._excess(cnt1[uni], 1)[None].astype(np.float32), np.zeros((0, lk), np.int16))
    self.lists: list[_Lists | None] = [None, unigram]
    if self.order == 1:
      return
    # Order 2: p_2 over every token = the context's continuations merged with the unigram list
    # (a token outside both is outranked by the whole unigram list), plus the unigram list itself
    # as one more context (index C) for positions whose order-2 context is unseen.
    t2 = c.orders[1]
    nctx = len(t2.ctx_keys)
    a2, b2 = self._weights(self._totals[1], self._distinct[1], self.discounts[2])
    ectx = t2.entry_ctx
    own_value = a2[ectx] * (t2.cnt - self.discounts[2]) + b2[ectx] * prob1[t2.tok]
    uni_by_id = np.sort(uni)
    back_ctx = np.repeat(np.arange(nctx), lk)
    back_tok = np.tile(uni_by_id, nctx)
    own_key = ectx * (1 << 32) + t2.tok  # sorted
    back_key = back_ctx * (1 << 32) + back_tok  # sorted
    hit = np.minimum(np.searchsorted(own_key, back_key), max(len(own_key) - 1, 0))
    fresh = own_key[hit] != back_key if len(own_key) else np.ones(len(back_key), bool)
    back_ctx, back_tok = back_ctx[fresh], back_tok[fresh]  # back-off rows not already own entries
    rows_ctx = np.concatenate([ectx, back_ctx, np.full(lk, nctx)])
    rows_tok = np.concatenate([t2.tok, back_tok, uni_by_id]).astype(np.int64)
    rows_val = np.concatenate([own_value, b2[back_ctx] * prob1[back_tok], prob1[uni_by_id]])
    rows_c2 = np.concatenate([t2.cnt, np.zeros(len(back_tok) + lk)])
    rows_entry = np.concatenate([np.arange(len(t2.tok)), np.full(len(back_tok) + lk, -1)])
    ranked = np.lexsort((-rows_val, rows_ctx))
    seg = np.searchsorted(rows_ctx[ranked], np.arange(nctx + 2))
    rank = np.arange(len(ranked)) - seg[rows_ctx[ranked]]
    keep = rank < lk
    chosen, rank = ranked[keep], rank[keep]
    tok2 = rows_tok[chosen]
    excess = np.stack([self._excess(cnt1[tok2], 1), self._excess(rows_c2[chosen], 2)])
    self.lists.append(_Lists(np.searchsorted(rows_ctx[chosen], np.arange(nctx + 2)),
                             tok2.astype(np.int32), excess.astype(np.float32),
                             np.zeros((0, len(chosen)), np.int16)))
    entry_rank = np.full(len(t2.tok), _NO_RANK, np.int16)  # rank of each order-2 entry in its list
    own = rows_entry[chosen] >= 0
    entry_rank[rows_entry[chosen][own]] = rank[own]
    entry_ranks = [None, None, entry_rank]
    entry_value = own_value
    for n in range(3, self.order + 1):  # own continuations; only over-long contexts are ranked
      t = c.orders[n - 1]
      ectx = t.entry_ctx
      a, b = self._weights(self._totals[n - 1], self._distinct[n - 1], self.discounts[n])
      value = a[ectx] * (t.cnt - self.discounts[n]) + b[ectx] * entry_value[t.sfx]
      slot = np.arange(len(t.tok)) - t.start[ectx]  # position within the list (any order works)
      long_entries = np.flatnonzero(t.distinct[ectx] > lk)
      if len(long_entries):
        ranked = long_entries[np.lexsort((-value[long_entries], ectx[long_entries]))]
        ctx_of = ectx[ranked]  # sorted
        slot[ranked] = np.arange(len(ranked)) - np.searchsorted(ctx_of, ctx_of)
      chosen = np.flatnonzero(slot < lk)
      start = np.zeros(len(t.ctx_keys) + 1, np.int64)
      np.cumsum(np.minimum(t.distinct, lk), out=start[1:])
      at = start[ectx[chosen]] + slot[chosen]  # where each chosen entry goes in the lists
      rank_of_entry = np.full(len(t.tok), _NO_RANK, np.int16)
      rank_of_entry[chosen] = slot[chosen]
      size = int(start[-1])
      tok = np.empty(size, np.int32)
      tok[at] = t.tok[chosen]
      excess = np.empty((n, size), np.float32)
      ranks = np.empty((n - 2, size), np.int16)
      e = chosen
      excess[n - 1, at] = t.cnt[e] - self.discounts[n]  # counts along the chain are all >= 1
      for m in range(n - 1, 0, -1):  # walk the suffix chain down to the unigram
        e = c.orders[m].sfx[e]
        excess[m - 1, at] = c.orders[m - 1].cnt[e] - self.discounts[m]
        if m >= 2:
          ranks[m - 2, at] = entry_ranks[m][e]
      self.lists.append(_Lists(start, tok, excess, ranks))
      entry_value = value
      entry_ranks.append(rank_of_entry)

  # ------------------------------------------------------------------------------------ query
  def _contexts(self, history: np.ndarray) -> np.ndarray:
    """[P, order + 1] index of each position's context per order (column n; -1: unseen)."""
    p = len(history)
    ctx = np.full((p, self.order + 1), -1, np.int64)
    ctx[:, 1] = 0
    todo = np.arange(p)
    for n in range(self.order, 1, -1):
      if not len(todo):
        break
      table = self.counts.orders[n - 1].ctx_keys
      keys = context_keys(history[todo], n, self.counts.bits)
      by_key = np.argsort(keys)  # sorted queries: searchsorted walks the table in order
      i = np.empty(len(keys), np.int64)
      i[by_key] = np.minimum(np.searchsorted(table, keys[by_key]), len(table) - 1)
      hit = table[i] == keys
      found, ci = todo[hit], i[hit]
      ctx[found, n] = ci
      for m in range(n, 2, -1):
        ci = self.counts.orders[m - 1].ctx_sfx[ci]
        ctx[found, m - 1] = ci
      todo = todo[~hit]
    return ctx

  def _label_counts(self, ctx: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[P, order + 1]: c(h_n, y) per order (column n) for positions whose top context was seen."""
    top = self.counts.orders[self.order - 1]
    c = ctx[:, self.order]
    if np.any(c < 0):
      raise ValueError(f"leave-one-out asked for {int(np.sum(c < 0))} position(s) whose context "
                       "the prior never counted: they are not positions of its corpus")
    lo, hi = top.start[c], top.start[c + 1]
    end = hi.copy()
    while True:  # binary search of the label among each context's entries (sorted by token)
      active = lo < hi
      if not active.any():
        break
      mid = (lo + hi) // 2
      less = top.tok[np.minimum(mid, len(top.tok) - 1)] < labels
      lo = np.where(active & less, mid + 1, lo)
      hi = np.where(active & ~less, mid, hi)
    e = np.minimum(lo, len(top.tok) - 1)
    hit = (lo < end) & (top.tok[e] == labels)
    if not hit.all():
      raise ValueError(f"leave-one-out asked for {int(np.sum(~hit))} position(s) whose (context, "
                       "token) the prior never counted: they are not positions of its corpus")
    out = np.zeros((len(c), self.order + 1))
    for n in range(self.order, 0, -1):
      out[:, n] = self.counts.orders[n - 1].cnt[e]
      if n > 1:
        e = self.counts.orders[n - 1].sfx[e]
    return out

  def query(self, history: np.ndarray, labels: np.ndarray | None = None,
            loo: np.ndarray | bool = False) -> SparsePrior:
    """pi at P positions. `history` [P, >= order - 1]: the previous response tokens, oldest first,
    BOS (= the counts' num_ids) before the response start; `labels` [P] the tokens there (needed
    for leave-one-out); `loo` [P] (or one bool): positions of the corpus the prior was counted on."""
    history = np.asarray(history)
    p = history.shape[0]
    loo = np.broadcast_to(np.asarray(loo, bool), (p,))
    if history.ndim != 2 or history.shape[1] < self.order - 1:
      raise ValueError(f"history must be [positions, >= {self.order - 1}], got {history.shape}")
    if loo.any() and labels is None:
      raise ValueError("leave-one-out needs the labels")
    if p == 0:
      return SparsePrior(np.zeros((0, self.k), np.int32), np.zeros((0, self.k), np.float32),
                         np.zeros(0, np.float32))
    v, order = self.vocab_size, self.order
    ctx = self._contexts(history)
    total = np.zeros((p, order + 1))
    distinct = np.zeros((p, order + 1))
    for n in range(1, order + 1):
      seen = ctx[:, n] >= 0
      ci = np.where(seen, ctx[:, n], 0)
      total[:, n] = np.where(seen, self._totals[n - 1][ci], 0.0)
      distinct[:, n] = np.where(seen, self._distinct[n - 1][ci], 0.0)
    ycount = None
    if loo.any():
      idx = np.flatnonzero(loo)
      ycount = np.zeros((p, order + 1))
      ycount[idx] = self._label_counts(ctx[idx], np.asarray(labels)[idx])
      total -= ycount > 0
      distinct -= ycount == 1
    a, b = self._weights(total, distinct, self.discounts[None, :])
    a[:, 0], b[:, 0] = 0.0, 1.0
    # big_b[:, n] = prod_{j > n} b_j; beta_n = a_n big_b_n; p_N(w) = sum_n beta_n excess_n(w) + base.
    big_b = np.ones((p, order + 1))
    big_b[:, :-1] = np.cumprod(b[:, :0:-1], axis=1)[:, ::-1]
    beta = (a * big_b).astype(np.float32)
    base = (big_b[:, 0] / v).astype(np.float32)

    # Candidates, in one [P, width] matrix (-inf where empty): first the base list (orders <= 2:
    # exactly list_len tokens at every position), then each longer context's own list, gathered
    # ragged (only its real entries).
    lk = self.list_len
    base_lists = self.lists[min(order, 2)]
    if order == 1:
      base_idx = np.broadcast_to(np.arange(lk), (p, lk))
    else:  # the order-2 context's merged list; the unigram one (the last) where it is unseen
      ci = np.where(ctx[:, 2] >= 0, ctx[:, 2], len(base_lists.start) - 2)
      base_idx = base_lists.start[ci][:, None] + np.arange(lk)[None]
    parts = []  # (order, column offset, rows, cols, list index) of each longer list's entries
    offset = lk
    for n in range(3, order + 1):
      lists = self.lists[n]
      seen = ctx[:, n] >= 0
      first = lists.start[np.where(seen, ctx[:, n], 0)]
      length = np.where(seen, lists.start[np.where(seen, ctx[:, n], 0) + 1] - first, 0)
      width = int(length.max())
      if not width:
        continue
      rows = np.repeat(np.arange(p), length)
      cols = np.arange(len(rows)) - np.repeat(np.cumsum(length) - length, length)
      parts.append((n, offset, rows, cols, np.repeat(first, length) + cols))
      offset += width
    value = np.full((p, offset), -np.inf, np.float32)
    tok = np.zeros((p, offset), np.int32)
    value[:, :lk] = base[:, None]
    for m in range(1, min(order, 2) + 1):
      value[:, :lk] += beta[:, m:m + 1] * base_lists.excess[m - 1].take(base_idx)
    tok[:, :lk] = base_lists.tok.take(base_idx)
    flat_value, flat_tok = value.reshape(-1), tok.reshape(-1)  # views: ragged scatters are 1-D
    drop = np.zeros(p * offset, bool)
    where = {n: at for n, at, *_ in parts}
    beta_t = np.ascontiguousarray(beta.T)
    for n, at, rows, cols, li in parts:
      lists = self.lists[n]
      row_base = rows * offset
      flat = base.take(rows)
      for m in range(1, n + 1):
        flat += beta_t[m].take(rows) * lists.excess[m - 1].take(li)
      flat_value[row_base + at + cols] = flat
      flat_tok[row_base + at + cols] = lists.tok.take(li)
      for m in range(2, n):  # a token counts once: at the longest context listing it
        r = lists.rank[m - 2].take(li)
        hit = r != _NO_RANK
        drop[row_base[hit] + where.get(m, 0) + r[hit]] = True
    flat_value[drop] = -np.inf
    if ycount is not None:  # the label's own probability with its occurrence removed
      yc = ycount[:, 1:] - 1.0
      excess = np.where(yc > 0, yc - self.discounts[None, 1:], 0.0)
      own = np.einsum("pm,pm->p", excess, beta[:, 1:]) + base
      is_y = loo[:, None] & (tok == np.asarray(labels)[:, None]) & np.isfinite(value)
      value = np.where(is_y, own[:, None].astype(np.float32), value)
    k = self.k
    width = value.shape[1]
    if width > k:
      part = np.argpartition(value, width - k, axis=1)[:, width - k:]
      part += (np.arange(p) * width)[:, None]
      value, tok = value.reshape(-1).take(part), tok.reshape(-1).take(part)
    probs = (1.0 - self.floor) * value.astype(np.float64) + self.floor / v
    rest = np.maximum(1.0 - probs.sum(axis=1), 0.0) / (v - k) if v > k else np.zeros(p)
    return SparsePrior(tok, probs.astype(np.float32), rest.astype(np.float32))
