"""Teacher records -> token ids with a loss mask: the chat rendered once, tokenised once.

A record's conversation (prompt messages + the teacher's response as the assistant turn) is rendered
with the tokenizer's chat template and tokenised as ONE string; the prompt/response boundary is the
character where the prompt rendered with `add_generation_prompt=True` ends, and a token is a
response token when its character span reaches past it (offset mapping). Tokenising prompt and
response separately and concatenating would differ from this at the boundary for SentencePiece
(Metaspace) tokenizers such as Llama-2's and Mistral's, i.e. from what the model sees when it reads
the whole conversation; a token that straddles the boundary (rare: the template's last prompt
characters merged with the response's first) is trained and counted.

The response keeps the template's end-of-turn tokens, so the model learns to stop, except for
responses the teacher did not finish (`finish_reason == "length"`): under `length_policy`
`no_eos` (default) they end where the text ends, with no end-of-turn token; `drop` removes them;
`keep` renders them like any other.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

TRUNCATION_POLICIES = ("drop", "truncate_response", "truncate_prompt")
LENGTH_POLICIES = ("no_eos", "drop", "keep")
# Appended to a cut-off response to find where its text ends in the rendered conversation.
_END = "\ue000proxykd-response-end\ue000"


@dataclasses.dataclass
class Example:
  """One tokenised record. `start` is the index of ids[0] in the record's full tokenisation
  (non-zero after truncate_prompt cut the prompt's beginning), so token j of this example is token
  `start + j` of the record: per-position artefacts are keyed by (record id, that offset).
  `features`: named per-token arrays [n, ...] aligned with `ids` (entry j belongs to token j, the
  way the loss mask does)."""
  ids: np.ndarray  # int32 [n]
  loss_mask: np.ndarray  # bool [n]: True on response tokens
  id: str = ""
  start: int = 0
  features: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def cut(self, lo: int, hi: int) -> "Example":
    """Tokens [lo, hi), features and offsets kept aligned."""
    return Example(self.ids[lo:hi], self.loss_mask[lo:hi], self.id, self.start + lo,
                   {k: v[lo:hi] for k, v in self.features.items()})


@dataclasses.dataclass
class TruncationStats:
  total: int = 0
  truncated: int = 0  # cut to fit, kept
  dropped: int = 0  # removed (too long under `drop`, or no response token left)
  unfinished: int = 0  # finish_reason == "length": trained without an end-of-turn token
  unfinished_dropped: int = 0  # finish_reason == "length" under length_policy=drop
  boundary_merged: int = 0  # a token straddled the prompt/response boundary (trained)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def add(self, other: "TruncationStats") -> "TruncationStats":
    return TruncationStats(**{k: v + getattr(other, k) for k, v in self.to_dict().items()})


def _messages(record: dict) -> list[dict]:
  return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]


def render(record: dict, tokenizer, length_policy: str = "no_eos") -> tuple[str, int]:
  """(the rendered conversation, the character where the response starts)."""
  messages = _messages(record)
  prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  unfinished = record.get("finish_reason") == "length" and length_policy == "no_eos"
  response = record["response"] + (_END if unfinished else "")
  full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                       tokenize=False)
  if not full.startswith(prompt):
    raise ValueError(f"record {record.get('id')!r}: the tokenizer's chat template does not render "
                     "the prompt (with add_generation_prompt) as a prefix of the conversation; "
                     "cannot separate prompt from response tokens")
  if unfinished:
    full = full[:full.rindex(_END)]
  return full, len(prompt)


def response_mask(offsets: np.ndarray, boundary: int) -> tuple[np.ndarray, int]:
  """Tokens whose character span reaches past `boundary` (zero-width ones: start at or after it).
  -> (mask, how many tokens straddle the boundary)."""
  start, end = offsets[:, 0], offsets[:, 1]
  mask = np.where(end > start, end > boundary, start >= boundary)
  return mask, int(np.sum((start < boundary) & (end > boundary)))


def tokenize(records: Sequence[dict], tokenizer, length_policy: str = "no_eos"
             ) -> tuple[list[Example], TruncationStats]:
  """Tokenise in one batched call (fast tokenizers parallelise it). -> (examples, counts)."""
  if length_policy not in LENGTH_POLICIES:
    raise ValueError(f"config.data.length_policy={length_policy!r}: choose one of "
                     f"{LENGTH_POLICIES}")
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: proxykd needs the "
                     "character offsets of a `tokenizers` tokenizer (a directory with "
                     "tokenizer.json) to separate prompt from response tokens exactly")
  stats = TruncationStats(total=len(records))
  kept = []
  for r in records:
    if r.get("finish_reason") == "length" and length_policy == "drop":
      stats.unfinished_dropped += 1
    else:
      stats.unfinished += int(r.get("finish_reason") == "length" and length_policy == "no_eos")
      kept.append(r)
  if not kept:
    return [], stats
  texts, boundaries = zip(*(render(r, tokenizer, length_policy) for r in kept))
  enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
  out = []
  for rec, ids, offsets, boundary in zip(kept, enc["input_ids"], enc["offset_mapping"], boundaries):
    mask, straddling = response_mask(np.asarray(offsets, np.int64).reshape(-1, 2), boundary)
    stats.boundary_merged += int(straddling > 0)
    out.append(Example(np.asarray(ids, np.int32), mask, rec.get("id", "")))
  return out, stats


def truncate(examples: Sequence[Example], max_tokens: int, policy: str,
             stats: TruncationStats | None = None) -> tuple[list[Example], TruncationStats]:
  """Fit every example into `max_tokens` tokens.

  drop: remove examples that are too long. truncate_response: cut the end (the response tail).
  truncate_prompt: cut the prompt from the left first, then the response tail if still too long.
  An example left without response tokens is dropped. Returns (kept, counts), the counts added to
  `stats` (e.g. those of `tokenize`) when given.
  """
  if policy not in TRUNCATION_POLICIES:
    raise ValueError(f"config.data.truncation={policy!r}: choose one of {TRUNCATION_POLICIES}")
  stats = dataclasses.replace(stats) if stats is not None else TruncationStats(total=len(examples))
  kept = []
  for ex in examples:
    cut = ex
    if len(ex.ids) > max_tokens:
      if policy == "drop":
        stats.dropped += 1
        continue
      lo = 0
      if policy == "truncate_prompt":
        prompt_len = int(np.argmax(ex.loss_mask)) if ex.loss_mask.any() else len(ex.ids)
        lo = min(len(ex.ids) - max_tokens, prompt_len)
      cut = ex.cut(lo, lo + max_tokens)
    # Position 0 is never a target (nothing predicts it), so a response must reach past it.
    if not cut.loss_mask[1:].any():
      stats.dropped += 1
      continue
    if len(cut.ids) < len(ex.ids):
      stats.truncated += 1
    kept.append(cut)
  return kept, stats
