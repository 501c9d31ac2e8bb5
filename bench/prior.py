"""Benchmark of the corpus prior: build time over 10M tokens and leave-one-out query throughput.

  python bench/prior.py [--tokens 10000000] [--vocab 32000] [--order 4] [--k 32] [--batch 65536]

Corpus: random responses (lengths uniform in [50, 350]) of Zipf(1.1)-distributed token ids over
the vocabulary, so every order has millions of distinct contexts. The build counts orders 1..4 and
builds the query view (Witten-Bell, K = 32); the query asks for the top-K prior with leave-one-out
at batches of 64k positions drawn from the corpus, the way the distillation pipeline does per batch.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxykd.estimator import ngram  # noqa: E402
from proxykd.estimator.prior import PriorView  # noqa: E402


def zipf_corpus(tokens: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  weights = 1.0 / np.arange(1, vocab + 1) ** 1.1
  cdf = np.cumsum(weights / weights.sum())
  lengths = []
  while sum(lengths) < tokens:
    lengths.append(int(rng.integers(50, 351)))
  lengths[-1] -= sum(lengths) - tokens
  flat = np.minimum(np.searchsorted(cdf, rng.random(tokens)), vocab - 1).astype(np.int32)
  return np.split(flat, np.cumsum(lengths)[:-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=10_000_000)
  parser.add_argument("--vocab", type=int, default=32_000)
  parser.add_argument("--order", type=int, default=4)
  parser.add_argument("--k", type=int, default=32)
  parser.add_argument("--batch", type=int, default=65_536)
  parser.add_argument("--batches", type=int, default=5)
  args = parser.parse_args()

  responses = zipf_corpus(args.tokens, args.vocab)
  ids = [f"r{i}" for i in range(len(responses))]
  t0, c0 = time.perf_counter(), time.process_time()
  counts = ngram.build_counts(responses, ids, [0] * len(responses), args.vocab, args.order)
  t1 = time.perf_counter()
  view = PriorView(counts, order=args.order, smoothing="wb", k=args.k, vocab_size=args.vocab)
  t2, c2 = time.perf_counter(), time.process_time()

  # Corpus positions with their histories, as the pipeline hands them over.
  rng = np.random.default_rng(1)
  pad = args.order - 1
  stream, pos = ngram._stream(responses, pad, args.vocab)  # pylint: disable=protected-access
  times, cpu = [], []
  view.query(stream[pos[:1024, None] - np.arange(pad, 0, -1)], stream[pos[:1024]], True)  # warm-up
  for _ in range(args.batches):
    at = pos[rng.integers(0, len(pos), args.batch)]
    hist = stream[at[:, None] - np.arange(pad, 0, -1)[None]]
    start, start_cpu = time.perf_counter(), time.process_time()
    view.query(hist, stream[at], loo=True)
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  print(json.dumps({
      "build_seconds_10m_tokens": round((t2 - t0) * 1e7 / args.tokens, 2),
      "query_tokens_per_s": round(args.batch / float(np.median(times))),
      # Process CPU time: what an otherwise idle core would take (the wall figures above include
      # waiting for a CPU on a shared machine; see load_average).
      "build_cpu_seconds_10m_tokens": round((c2 - c0) * 1e7 / args.tokens, 2),
      "query_tokens_per_cpu_s": round(args.batch / float(np.median(cpu))),
      "count_seconds": round(t1 - t0, 2), "view_seconds": round(t2 - t1, 2),
      "tokens": args.tokens, "vocab": args.vocab, "order": args.order, "k": args.k,
      "batch_positions": args.batch, "query_batch_seconds_median": round(float(np.median(times)), 4),
      "ngrams_per_order": [int(len(o.tok)) for o in counts.orders],
      "contexts_per_order": [int(len(o.ctx_keys)) for o in counts.orders],
      "counts_mb": round(counts.nbytes() / 2**20, 1),
      "targets": {"build_seconds_10m_tokens": "<= 30", "query_tokens_per_s": ">= 300000"},
      "load_average": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(), "machine": platform.machine(), "numpy": np.__version__,
  }))


if __name__ == "__main__":
  main()
