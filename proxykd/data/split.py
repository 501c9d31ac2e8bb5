"""The deterministic split of METHOD.md: held-out slice, D_w / D_p / D_s, by a hash of the PROMPT.

A record's split depends only on its prompt (the canonical `messages`), the fractions and the salt:
it never moves when the corpus grows, is re-ordered or is read on another host, and the n samples of
one prompt (`teacher.n > 1`) always land together. Splitting by the record id (which hashes the
sample index too) would spread them over warm-up, alignment, distillation and held-out, so that
calibration and evaluation would be measured on prompts the models trained on.
"""
from __future__ import annotations

import hashlib
import json
from typing import Iterable

import ml_collections

SPLITS = ("warmup", "align", "distill")  # D_w, D_p, D_s
HELDOUT = "heldout"


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(warmup=0.10, align=0.45, distill=0.45, heldout=0.01,
                                        salt="proxykd-split"))


def check_config(cfg) -> None:
  fractions = {name: float(cfg[name]) for name in SPLITS}
  bad = {k: v for k, v in {**fractions, "heldout": cfg.heldout}.items() if not 0 <= v <= 1}
  if bad:
    raise ValueError(f"config.split: fractions must lie in [0, 1], got {bad}")
  total = sum(fractions.values())
  if abs(total - 1.0) > 1e-6:
    raise ValueError(f"config.split: warmup + align + distill must sum to 1, got {total:g} "
                     f"({fractions})")
  if cfg.heldout >= 1:
    raise ValueError("config.split.heldout must be below 1")


def unit_hash(record_id: str, salt: str) -> float:
  """A uniform number in [0, 1) from the id."""
  digest = hashlib.sha256(f"{salt}\x00{record_id}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def prompt_key(record: dict) -> str:
  """The canonical prompt of a record: its messages as compact, key-sorted JSON."""
  msgs = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
  return json.dumps(msgs, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def assign(record: dict, cfg) -> str:
  """'heldout' for the held-out slice, else one of SPLITS in proportion to the fractions; decided
  by the record's prompt alone."""
  u = unit_hash(prompt_key(record), cfg.salt)
  if u < cfg.heldout:
    return HELDOUT
  u = (u - cfg.heldout) / (1.0 - cfg.heldout)
  edge = 0.0
  for name in SPLITS:
    edge += float(cfg[name])
    if u < edge:
      return name
  return SPLITS[-1]


def split_records(records: Iterable[dict], cfg) -> dict[str, list[dict]]:
  """{'warmup': [...], 'align': [...], 'distill': [...], 'heldout': [...]}, each in the order of the
  records' ids: corpus.jsonl is in the order the collector's concurrent requests finished, which
  differs from run to run, and everything downstream (packing, sampling batches) follows this
  order, so the same records must give the same lists."""
  check_config(cfg)
  out: dict[str, list[dict]] = {name: [] for name in (*SPLITS, HELDOUT)}
  for record in records:
    out[assign(record, cfg)].append(record)
  return {name: sorted(members, key=lambda r: r["id"]) for name, members in out.items()}
