"""The teacher's own top-k log-probabilities (OpenAI `logprobs`) as per-token features of our tokens.

The teacher reports log-probabilities over ITS tokens (strings). They become evidence about our
next-token distribution only where the two tokenisations agree: a response position of ours is
covered when one of the teacher's tokens spans exactly the same characters as our token there (so
the teacher's distribution at that point is a distribution over what comes next from the same
text), and each of the teacher's candidate strings there maps to our vocabulary when it is the text
of a single token of ours. Unmapped candidates are left out (their mass joins the remainder that
the posterior shares out in proportion to p_hat, METHOD.md); a position with no mapped candidate,
or not covered, falls back to the plain posterior. This is exact for the candidates it keeps up to
one approximation: a teacher string that is also a prefix of other teacher strings is our single
token's probability only in part (the teacher's longer strings would start with it too).

Features (packing.Example.features, aligned with the token ids): `teacher_ids` [n, kt] int32 (-1:
no candidate) and `teacher_logp` [n, kt] float32 (0 where the id is -1).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from proxykd.data import tokenize

KEYS = ("teacher_ids", "teacher_logp")


def token_strings(tokenizer) -> list[str]:
  """The text each id stands for inside a text (decoded after an anchor token, so that
  SentencePiece's 'strip the leading space of the first token' does not apply)."""
  anchor = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a"))[0]
  base = tokenizer.decode([anchor])
  ids = range(len(tokenizer))
  decoded = tokenizer.batch_decode([[anchor, i] for i in ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
  return [d[len(base):] if d.startswith(base) else d for d in decoded]


def vocabulary_map(tokenizer) -> dict[str, int]:
  """Text -> id for the tokens whose text no other token shares (special tokens and partial UTF-8
  byte tokens excluded)."""
  special = set(tokenizer.all_special_ids)
  seen: dict[str, int] = {}
  shared = set()
  for i, text in enumerate(token_strings(tokenizer)):
    if i in special or not text or "\ufffd" in text:
      continue
    if text in seen:
      shared.add(text)
    seen.setdefault(text, i)
  return {t: i for t, i in seen.items() if t not in shared}


@dataclasses.dataclass
class Coverage:
  """How much of the teacher's top-k evidence reached our tokens."""
  records: int = 0  # records with logprobs
  records_misaligned: int = 0  # logprobs that do not spell the response, or a template that alters it
  response_tokens: int = 0  # our response tokens in records with logprobs
  covered: int = 0  # ... whose characters one teacher token spans exactly
  with_candidates: int = 0  # ... with at least one candidate mapped to our ids
  candidates: int = 0  # teacher candidates at covered positions
  mapped: int = 0  # ... that are single tokens of ours

  def add(self, other: "Coverage") -> "Coverage":
    return Coverage(**{k: v + getattr(other, k) for k, v in dataclasses.asdict(self).items()})

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    n = max(self.response_tokens, 1)
    out.update(covered_fraction=self.covered / n, with_candidates_fraction=self.with_candidates / n,
               mapped_candidate_fraction=self.mapped / max(self.candidates, 1))
    return out


class TeacherFeatures:
  """`transform` for proxykd/data/pipeline.py build_rows: adds KEYS to every example of a record
  that carries logprobs (zeros / -1 elsewhere) and counts the coverage in `self.coverage`."""

  def __init__(self, records: Sequence[dict], tokenizer, k: int, length_policy: str = "no_eos"):
    self.records = {r["id"]: r for r in records if r.get("logprobs")}
    self.tokenizer, self.k, self.length_policy = tokenizer, k, length_policy
    self.vocab = vocabulary_map(tokenizer)
    self.coverage = Coverage()

  @property
  def key(self) -> str:
    """Enters the rows cache key (pipeline.build_rows transform_key)."""
    return f"teacher_topk:k={self.k}"

  def __call__(self, examples: list[tokenize.Example]) -> list[tokenize.Example]:
    self.coverage = Coverage()
    return [self._one(ex) for ex in examples]

  def _full(self, record: dict):
    """(ids, character offsets, where the response text starts) of the record's tokenisation."""
    text, boundary = tokenize.render(record, self.tokenizer, self.length_policy)
    enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.find(record["response"], boundary)
    return np.asarray(enc["input_ids"]), np.asarray(enc["offset_mapping"]).reshape(-1, 2), start

  def _one(self, ex: tokenize.Example) -> tokenize.Example:
    n = len(ex.ids)
    ids = np.full((n, self.k), -1, np.int32)
    logprobs = np.zeros((n, self.k), np.float32)
    record = self.records.get(ex.id)
    if record is not None:
      ids_full, offsets, start = self._full(record)
      tokens = record["logprobs"]
      cov = Coverage(records=1)
      spelled = "".join(t["token"] for t in tokens)
      if start < 0 or spelled != record["response"] or \
          not np.array_equal(ids_full[ex.start:ex.start + n], ex.ids):
        cov.records_misaligned = 1
      else:
        ends = np.cumsum([len(t["token"]) for t in tokens])
        spans = {(int(e - len(t["token"])), int(e)): t for t, e in zip(tokens, ends)}
        for j in range(n):
          if not ex.loss_mask[j]:
            continue
          cov.response_tokens += 1
          a, b = offsets[ex.start + j] - start
          t = spans.get((int(a), int(b)))
          if t is None:
            continue
          cov.covered += 1
          cands = t.get("top_logprobs") or [{"token": t["token"], "logprob": t["logprob"]}]
          kept = [(self.vocab[c["token"]], c["logprob"]) for c in cands if c["token"] in self.vocab]
          cov.candidates += len(cands)
          cov.mapped += len(kept)
          kept = sorted(dict(kept).items(), key=lambda x: -x[1])[:self.k]
          if kept:
            cov.with_candidates += 1
            ids[j, :len(kept)] = [i for i, _ in kept]
            logprobs[j, :len(kept)] = [lp for _, lp in kept]
      self.coverage = self.coverage.add(cov)
    return dataclasses.replace(ex, features={**ex.features, "teacher_ids": ids,
                                             "teacher_logp": logprobs})
