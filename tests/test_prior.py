"""The corpus n-gram prior: vectorised build and query against a naive dictionary implementation,
leave-one-out against deleting the occurrence, proper distributions, hashed contexts."""
import collections

import numpy as np
import pytest

from proxykd.estimator import ngram
from proxykd.estimator.prior import PriorView, Smoothing

V = 14  # tokenizer ids 0..13; BOS = 14
VOCAB = 17  # the model's vocabulary: three ids the tokenizer never produces


def _corpus(seed=0, n=40):
  rng = np.random.default_rng(seed)
  phrases = [rng.integers(0, V - 3, rng.integers(2, 5)) for _ in range(4)]
  out = []
  for _ in range(n):  # repeated phrases (long contexts seen often) mixed with noise
    parts = [phrases[rng.integers(0, 4)] if rng.random() < 0.6 else rng.integers(0, V - 1, 2)
             for _ in range(rng.integers(1, 4))]
    out.append(np.concatenate(parts).astype(np.int32))
  out.append(np.array([V - 2, V - 2, V - 1], np.int32))  # the only occurrence of token V - 1
  return out


def _positions(responses, order):
  """(histories [P, order - 1] with BOS padding, labels, (response, index) of each)."""
  hist, labels, where = [], [], []
  for r, resp in enumerate(responses):
    padded = np.concatenate([np.full(order - 1, V), resp])
    for i, y in enumerate(resp):
      hist.append(padded[i:i + order - 1])
      labels.append(y)
      where.append((r, i))
  return np.asarray(hist).reshape(len(labels), order - 1), np.asarray(labels), where


class NaivePrior:
  """Dictionaries of n-gram counts and the interpolation formulas written out token by token."""

  def __init__(self, responses, order, smoothing, floor, skip=None):
    self.order, self.smoothing, self.floor = order, Smoothing.parse(smoothing), floor
    self.counts = [collections.defaultdict(collections.Counter) for _ in range(order + 1)]
    for r, resp in enumerate(responses):
      padded = [V] * (order - 1) + list(map(int, resp))
      for i in range(len(resp)):
        if skip == (r, i):
          continue
        for n in range(1, order + 1):
          ctx = tuple(padded[i + order - 1 - (n - 1):i + order - 1])
          self.counts[n][ctx][padded[i + order - 1]] += 1
    self.discount = [0.0] * (order + 1)
    if self.smoothing.kind == "abs":
      for n in range(1, order + 1):
        if self.smoothing.discount is not None:
          self.discount[n] = self.smoothing.discount
        else:
          values = [c for counter in self.counts[n].values() for c in counter.values()]
          n1, n2 = values.count(1), values.count(2)
          self.discount[n] = min(max(n1 / (n1 + 2 * n2), 0.05), 1.0) if n1 + 2 * n2 else 0.5

  def dist(self, history):
    p = np.full(VOCAB, 1.0 / VOCAB)
    for n in range(1, self.order + 1):
      ctx = tuple(int(x) for x in history[len(history) - (n - 1):]) if n > 1 else ()
      counter = self.counts[n].get(ctx, {})
      total, distinct = sum(counter.values()), sum(1 for c in counter.values() if c > 0)
      if total == 0:
        continue
      new = np.zeros(VOCAB)
      d = self.discount[n]
      for w in range(VOCAB):
        c = counter.get(w, 0)
        if self.smoothing.kind == "wb":
          new[w] = (c + distinct * p[w]) / (total + distinct)
        else:
          new[w] = max(c - d, 0.0) / total + d * distinct / total * p[w]
      p = new
    return (1 - self.floor) * p + self.floor / VOCAB


def _check_sparse(sparse, dense, k):
  """Exact values at the returned ids, K distinct ids that are a top K, rest spread, sums to 1."""
  ids = sparse.ids.astype(np.int64)
  assert all(len(set(row)) == k for row in ids)
  np.testing.assert_allclose(sparse.probs, np.take_along_axis(dense, ids, 1), rtol=1e-6, atol=1e-8)
  outside = np.ones_like(dense, bool)
  np.put_along_axis(outside, ids, False, 1)
  if k < VOCAB:
    assert np.all(np.where(outside, dense, 0).max(1) <= sparse.probs.min(1) + 1e-7)
    # float32 probabilities: the rest is exact to a few 1e-9 (absolute)
    np.testing.assert_allclose(sparse.rest, np.where(outside, dense, 0).sum(1) / (VOCAB - k),
                               rtol=1e-5, atol=1e-8)
  total = sparse.probs.astype(np.float64).sum(1) + (VOCAB - k) * sparse.rest.astype(np.float64)
  np.testing.assert_allclose(total, 1.0, atol=1e-6)


@pytest.mark.parametrize("smoothing", ["wb", "abs", "abs:0.6"])
def test_vectorised_build_and_query_equal_a_naive_dictionary_implementation(smoothing):
  responses = _corpus()
  counts = ngram.build_counts(responses, [f"r{i}" for i in range(len(responses))],
                              [5] * len(responses), V, max_order=4)
  rng = np.random.default_rng(1)
  for order in (1, 2, 4):
    naive = NaivePrior(responses, order, smoothing, floor=1e-3)
    hist, labels, _ = _positions(responses, order)
    # Corpus histories plus random ones (mostly unseen contexts, like held-out text).
    hist = np.concatenate([hist, rng.integers(0, V + 1, (50, order - 1))])
    dense = np.stack([naive.dist(h) for h in hist])
    for k in (1, 4, VOCAB):
      view = PriorView(counts, order=order, smoothing=smoothing, k=k, vocab_size=VOCAB, floor=1e-3)
      _check_sparse(view.query(hist), dense, k)


@pytest.mark.parametrize("smoothing", ["wb", "abs:0.6"])
def test_leave_one_out_equals_the_prior_without_that_occurrence(smoothing):
  responses = _corpus(seed=2, n=25)
  ids = [f"r{i}" for i in range(len(responses))]
  counts = ngram.build_counts(responses, ids, [0] * len(responses), V, max_order=3)
  hist, labels, where = _positions(responses, 3)
  for k in (3, VOCAB):
    view = PriorView(counts, order=3, smoothing=smoothing, k=k, vocab_size=VOCAB, floor=1e-4)
    sparse = view.query(hist, labels, loo=True)
    brute = np.stack([NaivePrior(responses, 3, smoothing, 1e-4, skip=w).dist(h)
                      for w, h in zip(where, hist)])
    _check_sparse(sparse, brute, k)
    if k == VOCAB:  # the whole distribution, token by token
      dense = np.zeros((len(hist), VOCAB))
      np.put_along_axis(dense, sparse.ids.astype(np.int64), sparse.probs, 1)
      np.testing.assert_allclose(dense, brute, rtol=1e-6, atol=1e-9)


def test_a_token_seen_once_gets_only_floor_and_back_off_mass_at_its_own_occurrence():
  responses = _corpus(seed=3, n=20)
  counts = ngram.build_counts(responses, [f"r{i}" for i in range(len(responses))],
                              [0] * len(responses), V, max_order=3)
  hist, labels, _ = _positions(responses, 3)
  view = PriorView(counts, order=3, k=VOCAB, vocab_size=VOCAB, floor=1e-3)
  at = np.flatnonzero(labels == V - 1)
  assert len(at) == 1  # the corpus's single occurrence of token V - 1
  full = view.query(hist[at], labels[at], loo=False)
  loo = view.query(hist[at], labels[at], loo=True)

  def prob(sparse, token):
    return float(sparse.probs[0][list(sparse.ids[0]).index(token)])

  never_seen = VOCAB - 1  # an id the tokenizer cannot produce: only floor and back-off mass
  assert prob(full, V - 1) > 0.2  # with its own count the prior would give the label away
  assert prob(loo, V - 1) == pytest.approx(prob(loo, never_seen), rel=1e-6)
  assert prob(loo, V - 1) < 0.02


def test_hashed_contexts_give_the_same_prior():
  """Ids wide enough that order-4 contexts no longer pack into 64 bits are hashed instead."""
  responses = _corpus(seed=4, n=30)
  ids = [f"r{i}" for i in range(len(responses))]
  wide = 2**21  # 22 bits per symbol: 3 x 22 > 64
  assert not ngram.exact_context(4, ngram.symbol_bits(wide)) and ngram.exact_context(4, 5)
  exact = ngram.build_counts(responses, ids, [0] * len(responses), V, max_order=4)
  hashed = ngram.build_counts(responses, ids, [0] * len(responses), wide, max_order=4)
  hist, labels, _ = _positions(responses, 4)
  for loo in (False, True):
    a = PriorView(exact, order=4, k=5, vocab_size=wide).query(hist, labels, loo)
    b = PriorView(hashed, order=4, k=5, vocab_size=wide).query(np.where(hist == V, wide, hist),
                                                                labels, loo)
    order_a, order_b = np.argsort(a.ids, 1), np.argsort(b.ids, 1)
    assert np.array_equal(np.take_along_axis(a.ids, order_a, 1), np.take_along_axis(b.ids, order_b, 1))
    np.testing.assert_allclose(np.take_along_axis(a.probs, order_a, 1),
                               np.take_along_axis(b.probs, order_b, 1), rtol=1e-6)


def test_counts_round_trip_and_record_starts(tmp_path):
  responses = _corpus(seed=5, n=10)
  ids = [f"rec-{i}" for i in range(len(responses))]
  counts = ngram.build_counts(responses, ids, list(range(10, 10 + len(ids))), V, max_order=3)
  counts.save(tmp_path / "counts.npz")
  again = ngram.Counts.load(tmp_path / "counts.npz")
  assert again.num_tokens == sum(map(len, responses)) == counts.num_tokens
  assert list(again.response_start(["rec-3", "nope", "rec-0"])) == [13, -1, 10]
  hist, labels, _ = _positions(responses, 3)
  a = PriorView(counts, order=3, k=4, vocab_size=VOCAB).query(hist, labels, True)
  b = PriorView(again, order=3, k=4, vocab_size=VOCAB).query(hist, labels, True)
  assert np.array_equal(a.ids, b.ids) and np.array_equal(a.probs, b.probs)


def test_leave_one_out_refuses_positions_outside_the_corpus():
  responses = _corpus(seed=6, n=10)
  counts = ngram.build_counts(responses, [f"r{i}" for i in range(len(responses))],
                              [0] * len(responses), V, max_order=2)
  view = PriorView(counts, order=2, k=3, vocab_size=VOCAB)
  with pytest.raises(ValueError, match="never counted"):
    view.query(np.array([[V]]), np.array([VOCAB - 1]), loo=True)
  with pytest.raises(ValueError, match="order 5"):
    PriorView(counts, order=5)
  with pytest.raises(ValueError, match="smoothing"):
    Smoothing.parse("kneser")
