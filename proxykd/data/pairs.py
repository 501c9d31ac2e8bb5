"""Preference pairs for DPO: the teacher's response (chosen) and a proxy sample (rejected) of one
prompt, packed side by side in one row.

The rejected example is the chosen example's prompt tokens followed by the sampled token ids
exactly as the proxy produced them (no decode / re-tokenise round trip), so its log-probability
is that of the sample itself. A pair is one packing unit (proxykd/data/packing.py): chosen then
rejected, consecutive segments of the same row; the per-token feature `dpo_role` (1 chosen,
2 rejected) marks them, and the pair index of a token is (segment - 1) // 2.

Degenerate samples are handled by policy (`keep` or `drop` the pair) and counted: an `empty`
sample (no token before the end of turn), one `truncated` at the sampling limit, one `identical`
to the chosen response (no preference signal). A pair longer than the row gives each side at most
half of it under the data's truncation policy, counted as truncated.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from proxykd.data import tokenize
from proxykd.data.tokenize import Example

CHOSEN, REJECTED = 1, 2
POLICIES = ("keep", "drop")


@dataclasses.dataclass
class Sample:
  """A proxy sample for the prompt of record `id`: generated token ids (an end-of-turn token
  included if it ended the sample) and why it ended ("stop" or "length")."""
  id: str
  tokens: list[int]
  finish_reason: str


def prompt_length(ex: Example) -> int:
  return int(np.argmax(ex.loss_mask)) if ex.loss_mask.any() else len(ex.ids)


def _with_role(ex: Example, role: int) -> Example:
  return dataclasses.replace(ex, features={**ex.features, "dpo_role": np.full(len(ex.ids), role, np.int32)})


def fit_pair(chosen: Example, rejected: Example, seq_len: int, truncation: str):
  """Both sides in one row of seq_len slots (a document of n tokens fills n - 1): unchanged when
  they fit; else each side may keep at least half the row and a short side leaves the rest to the
  other. -> ((chosen, rejected) or None if the policy drops them, how many sides were cut)."""
  total = seq_len + 2  # tokens of two documents filling the row
  if len(chosen.ids) + len(rejected.ids) <= total:
    return (chosen, rejected), 0
  half = total // 2
  cap_c = max(half, total - len(rejected.ids))
  cap_r = total - min(len(chosen.ids), cap_c)
  c, stats_c = tokenize.truncate([chosen], cap_c, truncation)
  r, stats_r = tokenize.truncate([rejected], cap_r, truncation)
  if not (c and r):
    return None, 0
  return (c[0], r[0]), stats_c.truncated + stats_r.truncated


def build_pairs(chosen: Sequence[Example], samples: dict[str, Sample], *, seq_len: int,
                truncation: str, end_ids: Sequence[int], decode, policy: dict[str, str]
                ) -> tuple[list[tuple[Example, Example]], dict[str, int]]:
  """(pairs as packing units, counts). `decode(ids) -> text` (special tokens skipped) decides
  `identical`; `end_ids` are the end-of-turn ids a finished sample ends with; `policy` maps
  empty / truncated / identical to keep or drop."""
  for kind, value in policy.items():
    if value not in POLICIES:
      raise ValueError(f"config.dpo.on_{kind}={value!r}: choose one of {POLICIES}")
  counts = collections.Counter()
  out = []
  for ex in chosen:
    sample = samples.get(ex.id)
    if sample is None:
      counts["no_sample"] += 1
      continue
    n_prompt = prompt_length(ex)
    body = [t for t in sample.tokens if t not in end_ids]
    kinds = []
    if not body:
      kinds.append("empty")
    if sample.finish_reason == "length":
      kinds.append("truncated")
    if decode(body).strip() == decode(list(ex.ids[n_prompt:])).strip():
      kinds.append("identical")
    for kind in kinds:
      counts[kind] += 1
    if any(policy.get(kind, "keep") == "drop" for kind in kinds) or not sample.tokens:
      counts["dropped"] += 1
      continue
    ids = np.concatenate([ex.ids[:n_prompt], np.asarray(sample.tokens, np.int32)])
    rejected = Example(ids, np.arange(len(ids)) >= n_prompt, f"{ex.id}:rejected")
    sides, cut = fit_pair(ex, rejected, seq_len, truncation)
    if sides is None:
      counts["dropped_too_long"] += 1
      continue
    counts["truncated_to_fit"] += cut
    out.append((_with_role(sides[0], CHOSEN), _with_role(sides[1], REJECTED)))
  counts["pairs"] = len(out)
  return out, dict(counts)
