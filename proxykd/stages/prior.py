"""Stage `prior`: count the corpus n-gram prior over the response tokens of the training splits.

Inputs: the teacher corpus and the shared tokenizer (proxykd/stages/inputs.py). Outputs in
`<workdir>/prior/` (or config.output): `counts.npz` and `meta.json` (proxykd/estimator/store.py),
and `summary.json` (sizes, build time, and the prior's own held-out nats/token at its default
setting). A rerun whose inputs (records, tokenizer, orders, length policy) are unchanged keeps the
prior as it is.
"""
from __future__ import annotations

import hashlib
import json
import time

import jax
import numpy as np
from absl import logging
from etils import epath

from proxykd import runner
from proxykd.data import pipeline, split
from proxykd.estimator import build, store
from proxykd.estimator.features import PriorFeature
from proxykd.estimator.prior import PriorView, Smoothing
from proxykd.models.tokenizer import fingerprint, load_tokenizer
from proxykd.stages import inputs

STAGE = "prior"


def output_dir(config, workdir) -> epath.Path:
  return epath.Path(config.get("output") or runner.stage_dir(workdir, STAGE))


def _inputs_key(records, tokenizer, config) -> str:
  return hashlib.sha256(json.dumps({
      "records": pipeline.records_digest(records), "tokenizer": fingerprint(tokenizer),
      "max_order": int(config.max_order), "length_policy": config.data.length_policy},
      sort_keys=True).encode()).hexdigest()[:20]


def _check(config) -> None:
  bad = [s for s in config.splits if s not in split.SPLITS]
  if bad or not config.splits:
    raise runner.UserError(f"config.splits={tuple(config.splits)}: choose among {split.SPLITS} "
                           "(the held-out slice is never counted)")
  if not 1 <= config.max_order <= 8:
    raise runner.UserError(f"config.max_order={config.max_order}: use 1..8")
  if config.order > config.max_order:
    raise runner.UserError(f"config.order={config.order} exceeds config.max_order={config.max_order}")
  try:
    Smoothing.parse(config.smoothing)
  except ValueError as e:
    raise runner.UserError(f"config.smoothing: {e}") from None


def heldout_nats(view: PriorView, records, tokenizer, data) -> dict:
  """The prior alone on the held-out slice: nats/token of the teacher's tokens under pi."""
  if not records:
    return {}
  rows, _ = pipeline.build_rows(records, tokenizer, data, shuffle=False)
  arrays = rows.arrays
  feats = PriorFeature(view, rows.docs, corpus_rows=False)(arrays)
  mask = arrays["loss_mask"] > 0
  hit = feats["prior_ids"] == arrays["targets"][..., None]
  p = np.where(hit.any(-1), np.sum(np.where(hit, feats["prior_probs"], 0.0), -1), feats["prior_rest"])
  return {"heldout_tokens": int(mask.sum()),
          "heldout_nats_per_token": float(-np.log(p[mask].astype(np.float64)).mean())}


def run(config, workdir):
  _check(config)
  out = output_dir(config, workdir)
  parts, corpus = inputs.corpus_splits(config, workdir)
  records = [r for name in config.splits for r in parts[name]]
  if not records:
    raise runner.UserError(f"{corpus}: the splits {tuple(config.splits)} hold no records")
  tok_dir = inputs.tokenizer_dir(config, workdir)
  tokenizer = load_tokenizer(tok_dir)
  key = _inputs_key(records, tokenizer, config)
  if store.exists(out) and not config.force and store.read_meta(out).get("inputs_key") == key:
    logging.info("%s: %s is up to date (same records, tokenizer and orders)", STAGE, out)
    print(f"{STAGE}: {out} is up to date")
    return out

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  with tqdm(total=len(records), unit="record", desc=f"{STAGE}: tokenise",
            disable=not config.progress_bar, dynamic_ncols=True) as bar:
    try:
      counts = build.counts_from_records(records, tokenizer, config.max_order,
                                         config.data.length_policy, progress=bar.update,
                                         log=lambda msg: logging.info("%s: %s", STAGE, msg))
    except ValueError as e:
      raise runner.UserError(f"{STAGE}: {e}") from None
  seconds = time.perf_counter() - start
  order = config.max_order if config.order < 0 else config.order
  meta = {
      "inputs_key": key, "corpus": str(corpus), "splits": list(config.splits),
      "split": config.split.to_dict(), "records": len(records), "tokens": counts.num_tokens,
      "tokenizer": str(tok_dir), "tokenizer_fingerprint": fingerprint(tokenizer),
      "num_ids": counts.num_ids, "length_policy": config.data.length_policy,
      "max_order": counts.max_order,
      "defaults": {"order": order, "smoothing": str(Smoothing.parse(config.smoothing)),
                   "k": config.k, "floor": config.floor},
  }
  if jax.process_index() == 0:  # every host counts the same corpus; one writes it
    store.save(out, counts, meta)
  view = PriorView(counts, order=order, smoothing=config.smoothing, k=config.k,
                   vocab_size=len(tokenizer), floor=config.floor)
  summary = {"records": len(records), "tokens": counts.num_tokens, "build_seconds": round(seconds, 3),
             "ngrams_per_order": [int(len(o.tok)) for o in counts.orders],
             "contexts_per_order": [int(len(o.ctx_keys)) for o in counts.orders],
             "bytes": counts.nbytes(),
             **meta["defaults"], **heldout_nats(view, parts[split.HELDOUT], tokenizer, config.data)}
  if jax.process_index() == 0:
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
  logging.info("%s: %s", STAGE, summary)
  print(f"{STAGE}: {json.dumps(summary)}")
  return out
