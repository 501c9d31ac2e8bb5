"""Stage `cache_proxy`: run the aligned proxy once over D_s and keep, per response position, its
top-k token ids, their log-probabilities and the tail mass (paper App. A.1), so that offline
distillation (student_kd with kd.mode=offline) never needs the proxy in memory.

Layout and keys: proxykd/data/proxy_cache.py. Resumable: shards are written whole (a temporary
directory renamed), so a killed run redoes at most the shard it was writing and never writes one
twice; a cache begun under another fingerprint (rows, proxy, k, tau) is refused. At the end a
verifier re-computes `verify_rows` random rows with the proxy and checks them against the cache;
the size on disk and the write speed go to `summary.json` and the log.
"""
from __future__ import annotations

import json
import time

import numpy as np
from absl import logging
from etils import epath

from proxykd import hosts, runner
from proxykd.data import pipeline, proxy_cache
from proxykd.estimator import weights
from proxykd.models import checkpoint
from proxykd.models.tokenizer import load_tokenizer
from proxykd.stages import inputs
from proxykd.train import scoring, trainer
from proxykd.train import sharding as shd

STAGE = "cache_proxy"


def calibrated_tau(config, workdir) -> float:
  """config.tau, or (when < 0) the calibrate stage's chosen tau, or 1."""
  if config.tau >= 0:
    return float(config.tau)
  chosen = runner.stage_dir(workdir, "calibrate") / "chosen.json"
  if chosen.exists():
    return float(json.loads(chosen.read_text()).get("tau", 1.0))
  return 1.0


def rows_for(config, workdir, tokenizer, out: epath.Path):
  """The packed rows of D_s (unshuffled, cached): the positions the cache covers."""
  records, _, _ = inputs.load_split(config, workdir)
  rows, _ = pipeline.build_rows(records, tokenizer, config.data, shuffle=False,
                                cache_dir=out / "data_cache", name=config.split_name)
  return rows


def _shard_arrays(stats, rows, lo, hi):
  """The response positions of rows[lo:hi]: (docs, keys, ids, logp, tail, each doc's mean logp)."""
  mask = rows.arrays["loss_mask"][lo:hi] > 0
  doc = rows.arrays["doc"][lo:hi][mask]
  local, index = np.unique(doc, return_inverse=True)
  keys = np.stack([index, rows.arrays["offset"][lo:hi][mask]], axis=1)
  docs = [rows.docs[d] for d in local]
  means = dict(zip(*weights.per_record_mean_logp(stats["target_logp"], rows.arrays["loss_mask"][lo:hi],
                                                  rows.arrays["doc"][lo:hi], rows.docs)))
  return (docs, keys, stats["ids"][mask], stats["logp"][mask], stats["tail"][mask],
          np.asarray([means[d] for d in docs]))


def verify(scorer, params, rows, cache: proxy_cache.ProxyCache, n: int, seed: int) -> dict:
  """Re-compute n random rows and compare every response position with the cache."""
  picks = np.random.default_rng(seed).choice(len(rows), size=min(n, len(rows)), replace=False)
  worst, positions = 0.0, 0
  for r in picks:
    stats = scorer(params, rows, int(r), int(r) + 1)
    mask = rows.arrays["loss_mask"][r] > 0
    for t in np.flatnonzero(mask):
      rid = rows.docs[rows.arrays["doc"][r, t]]
      at = cache.lookup(rid, np.asarray([rows.arrays["offset"][r, t]]))[0]
      if at < 0:
        raise ValueError(f"verify: record {rid!r} offset {rows.arrays['offset'][r, t]} is not cached")
      got = dict(zip(cache.ids[at].tolist(), cache.logp[at].tolist()))
      want = dict(zip(stats["ids"][0, t].tolist(), stats["logp"][0, t].tolist()))
      common = set(got) & set(want)
      if len(common) < len(want) - 1:  # a tie at the k-th place may swap one id
        raise ValueError(f"verify: record {rid!r} offset {rows.arrays['offset'][r, t]}: cached top-k "
                         f"{sorted(got)} differ from the proxy's {sorted(want)}")
      worst = max(worst, max(abs(got[i] - want[i]) for i in common),
                  abs(float(cache.tail[at]) - float(stats["tail"][0, t]))
                  if np.isfinite(cache.tail[at]) else 0.0)
      positions += 1
  if worst > 1e-3:
    raise ValueError(f"verify: cached log-probs differ from the proxy's by up to {worst:.2e}")
  return {"verified_rows": int(len(picks)), "verified_positions": positions,
          "verified_max_abs_diff": worst}


def run(config, workdir):
  out = epath.Path(config.output or runner.stage_dir(workdir, STAGE))
  out.mkdir(parents=True, exist_ok=True)
  tok_dir = inputs.tokenizer_dir(config, workdir)
  tokenizer = load_tokenizer(tok_dir)
  rows = rows_for(config, workdir, tokenizer, out)
  ref = inputs.proxy_ref(config, workdir)
  tau = calibrated_tau(config, workdir)
  fp = proxy_cache.fingerprint(pipeline.fingerprint_of_rows(tokenizer, config.data),
                               checkpoint.weights_identity(ref), config.k, tau)
  existing = proxy_cache.read_manifest(out)
  if existing is not None:
    try:
      pipeline.check_fingerprint(existing["fingerprint"], fp, f"the cache in {out}")
    except ValueError as e:
      raise runner.UserError(f"{e} (or write it elsewhere with --config.output)") from None
  num_shards = -(-len(rows) // config.rows_per_shard)
  if hosts.is_main():  # every host computes every shard (the forward is sharded); one writes
    proxy_cache.write_manifest(out, {"fingerprint": fp, "num_shards": num_shards,
                                     "rows_per_shard": config.rows_per_shard, "rows": len(rows)})
  mesh = shd.mesh_from_config(config.mesh)
  params, cfg = inputs.model_for_inference(ref, trainer.shardings_for(mesh))
  if len(tokenizer) > cfg.vocab_size:
    raise runner.UserError(f"the tokenizer {tok_dir} has {len(tokenizer)} tokens, more than the "
                           f"proxy's vocabulary ({cfg.vocab_size})")
  target = scoring.target_stats(config.loss_chunk)
  stats = scoring.combined(scoring.topk_stats(config.k, config.loss_chunk, tau),
                           lambda h, k, b: {"target_logp": target(h, k, b)["logp"]})
  scorer = scoring.Scorer(cfg, mesh, config.batch_size, config.data.seq_len, config.loss_chunk,
                          stats=stats)
  todo = [s for s in range(num_shards) if not proxy_cache.shard_done(out, s)]
  logging.info("%s: %d rows of D_s in %d shards (%d to do), k=%d, tau=%g, proxy %s", STAGE,
               len(rows), num_shards, len(todo), config.k, tau, ref)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=num_shards, initial=num_shards - len(todo), unit="shard", desc=STAGE,
             disable=not config.progress_bar, dynamic_ncols=True)
  written, positions, start = 0, 0, time.perf_counter()
  for s in todo:
    lo, hi = s * config.rows_per_shard, min(len(rows), (s + 1) * config.rows_per_shard)
    arrays = _shard_arrays(scorer(params, rows, lo, hi), rows, lo, hi)
    if hosts.is_main():
      written += proxy_cache.write_shard(out, s, *arrays)
    positions += len(arrays[1])
    bar.update(1)
  bar.close()
  seconds = time.perf_counter() - start
  hosts.barrier("cache_proxy: shards written")
  cache = proxy_cache.ProxyCache(out, fp)
  size = sum(f.stat().length for f in out.glob("shard-*/*.npy"))
  summary = {"rows": len(rows), "positions": int(len(cache.offsets)), "k": config.k, "tau": tau,
             "bytes": int(size), "bytes_per_position": round(size / max(len(cache.offsets), 1), 1),
             "written_positions": positions, "write_seconds": round(seconds, 3),
             "positions_per_s": round(positions / seconds, 1) if positions else None}
  if config.verify_rows:
    try:
      summary.update(verify(scorer, params, rows, cache, config.verify_rows, config.seed))
    except ValueError as e:
      raise runner.UserError(f"{STAGE}: {e}") from None
  if hosts.is_main():
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
  logging.info("%s: %s", STAGE, summary)
  print(json.dumps(summary))
  return out
