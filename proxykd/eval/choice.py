"""Multiple choice by log-likelihood (ARC-, MMLU-, CommonsenseQA-style JSONL files a user supplies).

Each choice is scored as the assistant's reply to the question (the chat template, no end-of-turn
token after it: the choice is a continuation, not a finished turn), and the prediction is the choice
with the highest log-likelihood under three rules, all reported:
- `accuracy`: the summed log-probability of the choice's tokens (unnormalised);
- `accuracy_per_token`: that sum over the number of tokens (length-normalised);
- `accuracy_per_byte`: that sum over the choice's UTF-8 bytes (lm-evaluation-harness' acc_norm;
  independent of the tokenizer).

A line is `{"question": str, "choices": ..., "answer": ...}` (`id` optional) where `choices` is a
list of strings, a list of `{"label", "text"}` objects, or `{"label": [...], "text": [...]}` (the
Hugging Face ARC / CommonsenseQA layout), and `answer` (or `answerKey`) is the index of the right
choice, its label (default labels A, B, C, ...) or its text. ARC's `{"question": {"stem": ...,
"choices": [...]}, "answerKey": ...}` is read too.
"""
from __future__ import annotations

import dataclasses
import string
from typing import Sequence

import numpy as np

from proxykd.eval import jsonl, loglik
from proxykd.errors import UserError

RULES = ("accuracy", "accuracy_per_token", "accuracy_per_byte")


@dataclasses.dataclass
class Question:
  id: str
  question: str
  choices: list[str]
  labels: list[str]
  answer: int  # index into choices


def _choices(obj, where: str) -> tuple[list[str], list[str]]:
  if isinstance(obj, dict) and isinstance(obj.get("text"), list):
    texts = obj["text"]
    labels = obj.get("label") or list(string.ascii_uppercase[:len(texts)])
  elif isinstance(obj, list) and obj and all(isinstance(c, dict) for c in obj):
    texts = [c.get("text") for c in obj]
    labels = [c.get("label") for c in obj]
  elif isinstance(obj, list):
    texts, labels = obj, list(string.ascii_uppercase[:len(obj)])
  else:
    raise UserError(f"{where}: `choices` must be a list of strings, of {{label, text}} objects, or "
                    f"{{label: [...], text: [...]}}; got {str(obj)[:80]!r}")
  if len(texts) < 2 or not all(isinstance(t, str) and t.strip() for t in texts):
    raise UserError(f"{where}: `choices` needs at least two non-empty strings; got {str(texts)[:80]!r}")
  if len(labels) != len(texts) or not all(isinstance(l, str) for l in labels):
    raise UserError(f"{where}: `choices` labels {labels!r} do not match its {len(texts)} texts")
  return list(texts), [str(l) for l in labels]


def parse_question(obj: dict, where: str) -> Question:
  """One line of a multiple-choice file (module docstring) -> Question; UserError naming `where`."""
  q, choices = obj.get("question"), obj.get("choices")
  if isinstance(q, dict):  # ARC's original layout
    q, choices = q.get("stem"), q.get("choices", choices)
  if not isinstance(q, str) or not q.strip():
    raise UserError(f"{where}: `question` must be a non-empty string; the line has {sorted(obj)}")
  texts, labels = _choices(choices, where)
  answer = obj.get("answer", obj.get("answerKey"))
  if isinstance(answer, bool) or answer is None:
    raise UserError(f"{where}: `answer` (or `answerKey`) is missing: the index, label or text of "
                    "the right choice")
  if isinstance(answer, int):
    index = answer if 0 <= answer < len(texts) else None
  elif isinstance(answer, str) and answer.strip() in labels:
    index = labels.index(answer.strip())
  elif isinstance(answer, str) and answer in texts:
    index = texts.index(answer)
  elif isinstance(answer, str) and answer.strip().isdigit() and int(answer) < len(texts):
    index = int(answer)
  else:
    index = None
  if index is None:
    raise UserError(f"{where}: `answer` {answer!r} is neither an index below {len(texts)}, a label "
                    f"in {labels} nor one of the choices")
  qid = obj.get("id")
  return Question(str(qid) if qid is not None else where.rsplit(":", 1)[-1], q, texts, labels, index)


def load_questions(path) -> list[Question]:
  return jsonl.read_lines(path, parse_question)


def choice_records(questions: Sequence[Question], system_prompt: str = "") -> list[dict]:
  """One record per (question, choice): the question as the user turn, the choice as the reply."""
  system = [{"role": "system", "content": system_prompt}] if system_prompt else []
  return [{"messages": system + [{"role": "user", "content": q.question}], "response": c,
           "finish_reason": "length"} for q in questions for c in q.choices]


def predictions(questions: Sequence[Question], scored: Sequence[loglik.Scored | None]) -> list[dict]:
  """Per question: each choice's summed log-prob, token and byte counts, and each rule's pick."""
  out, at = [], 0
  for q in questions:
    rows = scored[at:at + len(q.choices)]
    at += len(q.choices)
    if any(r is None for r in rows):
      raise UserError(f"question {q.id!r}: a choice has no token left to score (empty, or too long "
                      "for config.seq_len)")
    total = np.asarray([r.sum_logprob for r in rows])
    ntok = np.asarray([r.num_tokens for r in rows])
    nbytes = np.asarray([max(len(c.encode("utf-8")), 1) for c in q.choices])
    picks = {"accuracy": int(np.argmax(total)), "accuracy_per_token": int(np.argmax(total / ntok)),
             "accuracy_per_byte": int(np.argmax(total / nbytes))}
    out.append({"id": q.id, "question": q.question, "choices": q.choices, "gold": q.labels[q.answer],
                "logprobs": total.tolist(), "tokens": ntok.tolist(),
                **{f"prediction/{k}": q.labels[v] for k, v in picks.items()},
                **{f"correct/{k}": v == q.answer for k, v in picks.items()}})
  return out


def summarize(rows: Sequence[dict]) -> dict:
  n = max(len(rows), 1)
  return {**{k: sum(r[f"correct/{k}"] for r in rows) / n for k in RULES}, "total": len(rows)}
