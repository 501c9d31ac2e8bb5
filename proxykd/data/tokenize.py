"""Teacher records -> token ids with a loss mask: prompt through the chat template, response trained.

The prompt is rendered with `add_generation_prompt=True`; the response is the rest of the rendered
conversation (the teacher's text plus the template's end-of-turn tokens, so the model learns to
stop). Prompt and response are tokenised separately, so the mask boundary is exact.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

TRUNCATION_POLICIES = ("drop", "truncate_response", "truncate_prompt")


@dataclasses.dataclass
class Example:
  ids: np.ndarray  # int32 [n]
  loss_mask: np.ndarray  # bool [n]: True on response tokens
  id: str = ""


@dataclasses.dataclass
class TruncationStats:
  total: int = 0
  truncated: int = 0  # cut to fit, kept
  dropped: int = 0  # removed (too long under `drop`, or no response token left)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def render(record: dict, tokenizer) -> tuple[str, str]:
  """(prompt text, response text) of a record under the tokenizer's chat template."""
  messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
  prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  full = tokenizer.apply_chat_template(
      messages + [{"role": "assistant", "content": record["response"]}], tokenize=False)
  if not full.startswith(prompt):
    raise ValueError(f"record {record.get('id')!r}: the tokenizer's chat template does not render "
                     "the prompt (with add_generation_prompt) as a prefix of the conversation; "
                     "cannot separate prompt from response tokens")
  return prompt, full[len(prompt):]


def tokenize(records: Sequence[dict], tokenizer) -> list[Example]:
  """Tokenise in one batched call per side (fast tokenizers parallelise it)."""
  if not records:
    return []
  prompts, responses = zip(*(render(r, tokenizer) for r in records))
  p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
  r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
  out = []
  for rec, p, r in zip(records, p_ids, r_ids):
    ids = np.asarray(list(p) + list(r), np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(p):] = True
    out.append(Example(ids, mask, rec.get("id", "")))
  return out


def truncate(examples: Sequence[Example], max_tokens: int, policy: str
             ) -> tuple[list[Example], TruncationStats]:
  """Fit every example into `max_tokens` tokens.

  drop: remove examples that are too long. truncate_response: cut the end (the response tail).
  truncate_prompt: cut the prompt from the left first, then the response tail if still too long.
  An example left without response tokens is dropped. Returns (kept, counts).
  """
  if policy not in TRUNCATION_POLICIES:
    raise ValueError(f"config.data.truncation={policy!r}: choose one of {TRUNCATION_POLICIES}")
  stats = TruncationStats(total=len(examples))
  kept = []
  for ex in examples:
    ids, mask = ex.ids, ex.loss_mask
    if len(ids) > max_tokens:
      if policy == "drop":
        stats.dropped += 1
        continue
      if policy == "truncate_prompt":
        prompt_len = int(np.argmax(mask)) if mask.any() else len(ids)
        cut = min(len(ids) - max_tokens, prompt_len)
        ids, mask = ids[cut:], mask[cut:]
      ids, mask = ids[:max_tokens], mask[:max_tokens]
    # Position 0 is never a target (nothing predicts it), so a response must reach past it.
    if not mask[1:].any():
      stats.dropped += 1
      continue
    if len(ids) < len(ex.ids):
      stats.truncated += 1
    kept.append(Example(ids, mask, ex.id))
  return kept, stats
