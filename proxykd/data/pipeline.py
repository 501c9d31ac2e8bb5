"""Records -> packed rows: tokenise with the chat template, truncate, shuffle by seed, pack; cached.

Tokenising a large corpus on every run, resume and host is wasted work: `build_rows` keeps the
packed rows in `cache_dir` (the stage directory's `data_cache/`), keyed by the records' content,
the tokenizer's fingerprint and every setting that changes the rows, and loads them from there
when the key matches. Process 0 writes the cache (atomically: a temporary file, then a rename);
a multi-host run's other processes read it or compute the same rows themselves.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from proxykd import paths
from proxykd.data import packing, tokenize
from proxykd.models.tokenizer import fingerprint

CACHE_VERSION = 1


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      seq_len=512,
      truncation="truncate_response",  # drop | truncate_response | truncate_prompt
      length_policy="no_eos",  # finish_reason=length responses: no_eos | drop | keep
      seed=0,  # shuffles documents before packing and rows every epoch
      cache=True,  # keep the packed rows in <stage dir>/data_cache/
  ))


def fingerprint_of_rows(tokenizer, data: ml_collections.ConfigDict) -> dict:
  """What decides which token sits at (record id, offset): artefacts keyed by positions (an offline
  proxy cache, per-token features) record it and are refused under another (`check_fingerprint`)."""
  return {"tokenizer": fingerprint(tokenizer), "seq_len": int(data.seq_len),
          "truncation": data.truncation, "length_policy": data.get("length_policy", "no_eos")}


def check_fingerprint(found: dict, expected: dict, what: str) -> None:
  """Refuse an artefact made under other rows: ValueError naming each key that differs."""
  diff = {k: (found.get(k), expected.get(k)) for k in expected if found.get(k) != expected.get(k)}
  if diff:
    detail = "; ".join(f"{k}: made with {a!r}, now {b!r}" for k, (a, b) in diff.items())
    raise ValueError(f"{what} was made under other token rows ({detail}); rebuild it")


def records_digest(records: Sequence[dict]) -> str:
  """A hash of what tokenisation reads from the records (ids, prompts, responses, finish)."""
  h = hashlib.sha256()
  for r in records:
    h.update(json.dumps([r.get("id"), r["messages"], r["response"], r.get("finish_reason")],
                        sort_keys=True, ensure_ascii=False).encode("utf-8"))
  return h.hexdigest()


def _tokenised(records, tokenizer, data) -> tuple[list[tokenize.Example], tokenize.TruncationStats]:
  examples, stats = tokenize.tokenize(records, tokenizer, data.get("length_policy", "no_eos"))
  return tokenize.truncate(examples, data.seq_len + 1, data.truncation, stats)


def build_rows(records: Sequence[dict], tokenizer, data: ml_collections.ConfigDict, *,
               shuffle: bool = True, cache_dir: epath.PathLike | None = None, name: str = "rows",
               transform: Callable[[list[tokenize.Example]], list] | None = None,
               transform_key: str = "") -> tuple[packing.Rows, tokenize.TruncationStats]:
  """Packed rows of `records` (documents shuffled by `data.seed` first) and the counts.

  `transform` (examples -> packing units: e.g. add per-token features, or group chosen with
  rejected) runs between truncation and packing; `transform_key` must change whenever its output
  would, since it enters the cache key.
  """
  key = hashlib.sha256(json.dumps({
      "v": CACHE_VERSION, "records": records_digest(records), **fingerprint_of_rows(tokenizer, data),
      "seed": data.seed, "shuffle": shuffle, "transform": transform_key},
      sort_keys=True).encode()).hexdigest()[:20]
  path = epath.Path(cache_dir) / f"{name}-{key}.npz" if cache_dir and data.get("cache", True) else None
  if path is not None and path.exists():
    rows, stats = load_rows(path)
    logging.info("%s: %d packed rows from the cache %s", name, len(rows), path)
    return rows, stats
  examples, stats = _tokenised(records, tokenizer, data)
  if shuffle:
    order = np.random.default_rng([data.seed, 0x5EED]).permutation(len(examples))
    examples = [examples[i] for i in order]
  rows = packing.pack(transform(examples) if transform else examples, data.seq_len)
  if path is not None and jax.process_index() == 0:
    save_rows(path, rows, stats)
  return rows, stats


def save_rows(path: epath.PathLike, rows: packing.Rows, stats: tokenize.TruncationStats) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, **{f"a/{k}": v for k, v in rows.arrays.items()},
           docs=np.asarray(rows.docs, dtype=str), stats=np.asarray(json.dumps(stats.to_dict())))
  paths.write_bytes(path, buf.getvalue())


def load_rows(path: epath.PathLike) -> tuple[packing.Rows, tokenize.TruncationStats]:
  with np.load(io.BytesIO(epath.Path(path).read_bytes())) as z:
    arrays = {k[2:]: z[k] for k in z.files if k.startswith("a/")}
    return (packing.Rows(arrays, [str(d) for d in z["docs"]]),
            tokenize.TruncationStats(**json.loads(str(z["stats"]))))
