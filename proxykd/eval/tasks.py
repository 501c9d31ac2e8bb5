"""Generative evaluation tasks: the prompts, the gold answers and how an output is read.

A task is a list of `Item`s (chat prompt, gold answer, the answer format that reads an output) plus
its generation settings. Built here:
- `gsm8k`: ../shared/data/gsm8k/<split>.jsonl, zero-shot as in the paper, or k-shot with the first
  k problems of the train file as earlier chat turns (their solutions without the `<<...>>`
  calculator annotations);
- `bbh`: the 27 tasks, 3-shot chain of thought with each task's cot-prompts file exactly as
  proxykd/data/prompts.py `load_bbh` writes it ("<exemplars>\\n\\nQ: <input>\\nA: Let's think step
  by step."), or zero-shot ("Q: <input>\\nA: Let's think step by step."); accuracy per BBH task and
  their macro average;
- `synthetic`: held-out problems of the synthetic teacher's generator, read like GSM8K;
- `prompts`: any prompt source of the collect stage (a file, `tfds:NAME/CONFIG:SPLIT`, ...) with
  the gold answer in a meta field and a named answer format.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Sequence

from proxykd.data import prompts as prompt_sources
from proxykd.eval import answers
from proxykd.errors import UserError

BBH_COT_SUFFIX = "\nA: Let's think step by step."
GENERATIVE_FORMATS = ("gsm8k", "choice", "binary", "number", "text")


@dataclasses.dataclass
class Item:
  """One prompt to answer. `group` is the accuracy group (a BBH task; the task name otherwise)."""
  id: str
  messages: list[dict]
  gold: str
  group: str
  answer_format: str  # one of GENERATIVE_FORMATS
  labels: tuple[str, ...] = ()  # a binary format's two labels

  def predict(self, text: str) -> str | None:
    """The answer read from a generated text."""
    if self.answer_format == "gsm8k":
      return answers.gsm8k_prediction(text)
    return answers.bbh_prediction(text, self.answer_format, self.labels)

  def correct(self, prediction: str | None) -> bool:
    if self.answer_format == "gsm8k":
      return answers.gsm8k_correct(prediction, self.gold)
    return answers.bbh_correct(prediction, self.gold, self.answer_format)


@dataclasses.dataclass
class Task:
  """A generative task: items and how to generate for them."""
  name: str
  items: list[Item]
  max_new_tokens: int
  stop: tuple[str, ...] = ()  # stop strings, cut exactly on the host


def _with_system(messages: list[dict], system_prompt: str) -> list[dict]:
  return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages


def strip_calculator(solution: str) -> str:
  """A GSM8K solution without its `<<48/2=24>>` calculator annotations."""
  return re.sub(r"<<[^>]*>>", "", solution)


def gsm8k_shots(root: Path, k: int) -> list[dict]:
  """The first k problems of the GSM8K train file as (user, assistant) chat turns."""
  if k <= 0:
    return []
  path = root / "gsm8k" / "train.jsonl"
  rows = prompt_sources.load_rows(str(path))[:k]
  turns = []
  for row in rows:
    turns += [{"role": "user", "content": row["question"]},
              {"role": "assistant", "content": strip_calculator(row["answer"]).strip()}]
  return turns


def gsm8k_task(root: Path, *, split: str = "test", shots: int = 0, system_prompt: str = "",
               limit: int = 0, max_new_tokens: int = 512) -> Task:
  prompts = prompt_sources.load_gsm8k(root, split)
  if limit > 0:
    prompts = prompts[:limit]
  shot_turns = gsm8k_shots(root, shots)
  items = [Item(f"gsm8k:{split}:{p['meta']['index']}",
                _with_system(shot_turns + p["messages"], system_prompt), p["meta"]["answer"],
                "gsm8k", "gsm8k") for p in prompts]
  return Task("gsm8k", items, max_new_tokens)


def bbh_task(root: Path, *, tasks: str = "all", shots: int = 3, limit: int = 0,
             max_new_tokens: int = 512) -> Task:
  """BBH: `shots` 3 (the cot-prompts exemplars) or 0; `limit` items per BBH task."""
  if shots not in (0, 3):
    raise UserError(f"config.bbh.shots={shots}: BBH has 3-shot chain-of-thought prompts (3) or "
                    "none (0)")
  prompts = prompt_sources.load_bbh(root, tasks, cot=shots == 3)
  by_task: dict[str, list[dict]] = {}
  for p in prompts:
    by_task.setdefault(p["meta"]["task"], []).append(p)
  items = []
  for name, group in by_task.items():
    fmt, labels = answers.infer_format([p["meta"]["target"] for p in group])
    for p in group[:limit] if limit > 0 else group:
      messages = p["messages"]
      if shots == 0:
        messages = [{"role": "user", "content": f"Q: {messages[0]['content']}{BBH_COT_SUFFIX}"}]
      items.append(Item(f"bbh:{name}:{p['meta']['index']}", messages, p["meta"]["target"], name,
                        fmt, labels))
  # A 3-shot model tends to go on with the next "Q:"; cut it there.
  return Task("bbh", items, max_new_tokens, stop=("\n\nQ:",))


def synthetic_task(*, num: int = 200, split: str = "heldout", seed: int = 0, system_prompt: str = "",
                   limit: int = 0, max_new_tokens: int = 256) -> Task:
  prompts = prompt_sources.load_synthetic(num, split, seed)
  if limit > 0:
    prompts = prompts[:limit]
  items = [Item(f"synthetic:{split}:{seed}:{p['meta']['index']}",
                _with_system(p["messages"], system_prompt), p["meta"]["answer"], "synthetic",
                "gsm8k") for p in prompts]
  return Task("synthetic", items, max_new_tokens)


def prompts_task(cfg, *, name: str, answer_field: str, answer_format: str, labels: Sequence[str] = (),
                 system_prompt: str = "", limit: int = 0, max_new_tokens: int = 512,
                 stop: Sequence[str] = ()) -> Task:
  """Items from a collect-style `prompts` block (file, tfds, ...); the gold answer is the prompt's
  meta field `answer_field` (add it to prompts.meta_fields)."""
  if answer_format not in GENERATIVE_FORMATS:
    raise UserError(f"config.prompts.answer_format={answer_format!r}: choose one of "
                    f"{GENERATIVE_FORMATS}")
  if answer_format == "binary" and len(labels) != 2:
    raise UserError("config.prompts.labels: the binary format needs the two labels, e.g. 'Yes,No'")
  loaded = prompt_sources.load_prompts(cfg)
  if limit > 0:
    loaded = loaded[:limit]
  items = []
  for i, p in enumerate(loaded):
    if answer_field not in p["meta"]:
      raise UserError(f"config.prompts.answer_field={answer_field!r} is not among the prompt's "
                      f"meta fields {sorted(p['meta'])}; add it to prompts.meta_fields")
    items.append(Item(f"{name}:{p['meta'].get('index', i)}", _with_system(p["messages"], system_prompt),
                      str(p["meta"][answer_field]), name, answer_format, tuple(labels)))
  return Task(name, items, max_new_tokens, tuple(s for s in stop if s))
