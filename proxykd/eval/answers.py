"""Answers out of generated text: GSM8K numbers and BBH answers in each task's format.

GSM8K (and the synthetic teacher's problems, which end the same way): the prediction is the number
after the first '####' (lm-evaluation-harness' strict match: a model that goes on repeating itself
is judged by its first final answer), else the last number in the text; `$` and thousands commas are stripped and
the number is written canonically ("1,000.50" -> "1000.5", "18.00" -> "18"), so exact match
compares values as the GSM8K reference answers write them (integers without commas).

BBH: the answer follows the last "So the answer is" (the phrase every chain-of-thought exemplar
ends with), read according to the task's format, which is inferred from the task's targets:
- `choice`: an option letter "(A)".."(R)" (13 of the 27 tasks);
- `binary`: one of the task's two labels (True/False, Yes/No, yes/no, valid/invalid), matched as a
  whole word whatever its case and written as the task writes it;
- `number`: an integer (multistep_arithmetic_two, object_counting);
- `text`: free text compared after whitespace normalisation (dyck_languages, word_sorting).
Without the phrase (e.g. zero-shot output that ignores the format) the whole text is searched and
the LAST match of the format is taken (last option letter, last label word, last number, last
non-empty line).
"""
from __future__ import annotations

import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Sequence

NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")
CHOICE = re.compile(r"\(([A-Z])\)")
ANSWER_PHRASE = re.compile(r"so the answer is", re.IGNORECASE)
FORMATS = ("choice", "binary", "number", "text")


def normalize_number(text: str) -> str | None:
  """A number as text -> canonical form ("$1,000.50" -> "1000.5", "-3.0" -> "-3"); None if it is
  not a number."""
  s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
  try:
    d = Decimal(s)
  except InvalidOperation:
    return None
  if not d.is_finite():
    return None
  if d == d.to_integral_value():
    return str(int(d))
  return format(d.normalize(), "f")


def numbers(text: str) -> list[str]:
  """Every number in `text`, in order, canonical (see normalize_number)."""
  out = []
  for m in NUMBER.finditer(text):
    n = normalize_number(m.group(0))
    if n is not None:
      out.append(n)
  return out


def gsm8k_prediction(text: str) -> str | None:
  """The number right after the first '####', else the last number in the text; None if none."""
  if "####" in text:
    found = numbers(text.split("####", 1)[1])
    if found:
      return found[0]
  found = numbers(text)
  return found[-1] if found else None


def gsm8k_correct(prediction: str | None, gold: str) -> bool:
  """Exact match of the two numbers, both written canonically."""
  if prediction is None:
    return False
  pred = normalize_number(prediction)
  return pred is not None and pred == normalize_number(gold)


# ----------------------------------------------------------------------------- BBH
def infer_format(targets: Sequence[str]) -> tuple[str, tuple[str, ...]]:
  """A BBH task's answer format from its targets -> (format, the labels of a binary task).

  The format most targets fit wins (a few tasks have stray free-text targets among their option
  letters, e.g. movie_recommendation's "Monsters, Inc")."""
  targets = [t.strip() for t in targets]
  kinds = Counter()
  for t in targets:
    if CHOICE.fullmatch(t):
      kinds["choice"] += 1
    elif normalize_number(t) is not None and re.fullmatch(r"-?\d+", t):
      kinds["number"] += 1
    else:
      kinds["word"] += 1
  kind, n = kinds.most_common(1)[0]
  if kind != "word" and n >= 0.9 * len(targets):
    return kind, ()
  labels = Counter(targets)
  if len(labels) == 2 and all(" " not in t for t in labels):
    return "binary", tuple(sorted(labels))
  return "text", ()


def _after_phrase(text: str) -> str | None:
  """What follows the last "So the answer is", up to the end of its line; None without it."""
  found = list(ANSWER_PHRASE.finditer(text))
  if not found:
    return None
  rest = text[found[-1].end():].strip()
  return rest.split("\n", 1)[0].strip()


def _strip_end(s: str) -> str:
  return re.sub(r"\s+", " ", s).strip().rstrip(".").strip()


def bbh_prediction(text: str, fmt: str, labels: Sequence[str] = ()) -> str | None:
  """The answer in `text` in format `fmt` (module docstring); None when there is none."""
  span = _after_phrase(text)
  if fmt == "choice":
    if span is not None:
      m = CHOICE.search(span)
      if m:
        return f"({m.group(1)})"
      bare = re.fullmatch(r"\(?([A-Z])\)?", _strip_end(span))
      if bare:
        return f"({bare.group(1)})"
      return _strip_end(span) or None
    found = CHOICE.findall(text)
    return f"({found[-1]})" if found else None
  if fmt == "binary":
    words = re.compile(r"\b(" + "|".join(map(re.escape, labels)) + r")\b", re.IGNORECASE)
    canon = {l.lower(): l for l in labels}
    if span is not None:
      m = words.search(span)
      return canon[m.group(1).lower()] if m else (_strip_end(span) or None)
    found = words.findall(text)
    return canon[found[-1].lower()] if found else None
  if fmt == "number":
    found = numbers(span if span is not None else text)
    if not found:
      return None
    return found[0] if span is not None else found[-1]
  if fmt == "text":
    if span is not None:
      return _strip_end(span) or None
    lines = [l for l in (_strip_end(x) for x in text.splitlines()) if l]
    return lines[-1] if lines else None
  raise ValueError(f"unknown BBH answer format {fmt!r}; known: {FORMATS}")


def bbh_correct(prediction: str | None, target: str, fmt: str) -> bool:
  if prediction is None:
    return False
  if fmt == "number":
    return normalize_number(prediction) == normalize_number(target)
  return _strip_end(prediction) == _strip_end(target)
