"""The prior on disk: `<dir>/counts.npz` (the n-gram counts, proxykd/estimator/ngram.py) and
`<dir>/meta.json` (what it was built from and with which tokenizer).

A prior's token ids mean something only under the tokenizer that made them: `load` refuses a prior
built with another tokenizer (by fingerprint, proxykd/models/tokenizer.py), naming both, and one
tokenised under another length policy (which decides whether an unfinished response ends with the
end-of-turn token, i.e. which tokens the counted positions hold).
"""
from __future__ import annotations

import json
from typing import Any

from etils import epath

from proxykd.estimator.ngram import Counts
from proxykd.models.tokenizer import fingerprint

COUNTS, META = "counts.npz", "meta.json"


def exists(directory: epath.PathLike) -> bool:
  d = epath.Path(directory)
  return (d / COUNTS).exists() and (d / META).exists()


def save(directory: epath.PathLike, counts: Counts, meta: dict[str, Any]) -> None:
  """Counts first, meta last: a directory with meta.json holds a complete prior."""
  d = epath.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  counts.save(d / COUNTS)
  tmp = d / f"{META}.tmp"
  tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
  tmp.replace(d / META)


def read_meta(directory: epath.PathLike) -> dict[str, Any]:
  return json.loads((epath.Path(directory) / META).read_text())


def load(directory: epath.PathLike, tokenizer, tokenizer_name: str,
         length_policy: str | None = None) -> tuple[Counts, dict[str, Any]]:
  """(counts, meta) of the prior in `directory`, checked against `tokenizer` (named
  `tokenizer_name` in errors) and the data's `length_policy`. ValueError when it does not fit."""
  d = epath.Path(directory)
  if not exists(d):
    raise FileNotFoundError(f"no prior in {d} ({COUNTS} and {META}); run the prior stage")
  meta = read_meta(d)
  now = fingerprint(tokenizer)
  if meta.get("tokenizer_fingerprint") != now:
    raise ValueError(f"the prior in {d} was built with the tokenizer {meta.get('tokenizer')} "
                     f"(fingerprint {meta.get('tokenizer_fingerprint')}), not with "
                     f"{tokenizer_name} (fingerprint {now}): its token ids mean other tokens; "
                     "rebuild it with this tokenizer")
  if length_policy is not None and meta.get("length_policy") != length_policy:
    raise ValueError(f"the prior in {d} was tokenised with data.length_policy="
                     f"{meta.get('length_policy')!r}, these rows with {length_policy!r}; rebuild "
                     "it or use the same policy")
  return Counts.load(d / COUNTS), meta
