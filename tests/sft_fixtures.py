"""Test helpers for the training tests: a small teacher corpus and a demo tokenizer on disk."""
from __future__ import annotations

import json
import random
from pathlib import Path

from proxykd.data.corpus import CorpusWriter, record_id

TEACHER = {"model": "synthetic-teacher", "temperature": 0.0}


def make_record(question: str, answer: str, sample_index: int = 0) -> dict:
  messages = [{"role": "user", "content": question}]
  return {"id": record_id(messages, TEACHER, sample_index), "messages": messages,
          "response": answer, "sample_index": sample_index, "teacher": TEACHER,
          "finish_reason": "stop",
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for i in range(n):
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    steps = " ".join(f"{a} plus {k} is {a + k}." for k in range(rng.randint(0, 6)))
    out.append(make_record(f"What is {a} plus {b}? (question {i})",
                           f"{steps} So {a} plus {b} is {a + b}.\n#### {a + b}"))
  return out


def write_corpus(path: Path, records: list[dict]) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with CorpusWriter(path) as w:
    for r in records:
      w.write(r)
  return path


def demo_tokenizer(directory: Path, records: list[dict], vocab_size: int = 512):
  from proxykd.models.tokenizer import build_demo_tokenizer  # pylint: disable=g-import-not-at-top
  texts = [m["content"] for r in records for m in r["messages"]] + [r["response"] for r in records]
  return build_demo_tokenizer(directory, texts, vocab_size)


def read_metrics(path: Path) -> dict[int, dict]:
  """metrics.jsonl -> {step: merged scalars} (later lines win)."""
  out: dict[int, dict] = {}
  for line in path.read_text().splitlines():
    row = json.loads(line)
    out.setdefault(row.pop("step"), {}).update(row)
  return out
