"""The synthetic teacher: a black box that answers GSM8K-style problems step by step.

A response is a chain of segments: an opener, one sentence per computation step, a closing
sentence, then `#### <answer>`. Each segment is drawn from a few phrasings with fixed weights
(tempered by the request's temperature and cut by top_p), so the outputs form a real distribution
whose per-token probabilities are known exactly. Tokens are words with their leading spaces, and
newlines; every phrasing ends in one newline, so no phrasing is a prefix of another and the
next-token distribution inside a segment is the mass of the phrasings that agree with the prefix.
Reported logprobs are those of the untempered distribution, as OpenAI's API reports them.

Prompts it does not recognise get a naive answer: the sum of the numbers in the last user message.
"""
from __future__ import annotations

import math
import random
import re

from proxykd.data import problems
from proxykd.teacher.backend import Choice, Token, truncate

MODEL_NAME = "synthetic-gsm"
_TOKEN = re.compile(r"\n|[^\S\n]*\S+|[^\S\n]+")
OPENERS = ("Let's solve this step by step.", "We work it out one step at a time.", "Let's think step by step.")
CLOSERS = ("The answer is {ans}.", "So the final answer is {ans}.", "Therefore, the answer is {ans}.")
WEIGHTS = (0.6, 0.25, 0.15)


def tokenize(text: str) -> list[str]:
  return _TOKEN.findall(text)


def _segments(question: str) -> list[tuple[str, ...]]:
  """The phrasings of each segment of the response to `question` (every phrasing ends in '\\n')."""
  parsed = problems.parse(question)
  if parsed is None:
    nums = [int(x) for x in re.findall(r"\d+", question)][:8]
    total = sum(nums)
    calc = (" + ".join(map(str, nums)) + f" = {total}") if nums else "0"
    steps = [(f"The numbers given add up to {calc}.", f"Adding the numbers gives {calc}.",
              f"Summing everything: {calc}.")]
    ans = total
  else:
    t, v = parsed
    steps = []
    for s in t.steps:
      calc = s.calc.format(**v) + f" = {v[s.out]}"
      steps.append(tuple(p.format(**v, calc=calc) for p in s.phrasings))
    ans = v[t.answer]
  segs = [OPENERS, *steps, tuple(c.format(ans=ans) for c in CLOSERS)]
  return [tuple(p + "\n" for p in seg) for seg in segs] + [(f"#### {ans}",)]


def _sampling_probs(weights: list[float], temperature: float, top_p: float) -> list[float]:
  if temperature <= 0:
    best = max(range(len(weights)), key=weights.__getitem__)
    return [float(i == best) for i in range(len(weights))]
  p = [w ** (1.0 / temperature) for w in weights]
  z = sum(p)
  p = [x / z for x in p]
  order = sorted(range(len(p)), key=lambda i: -p[i])
  keep, mass = set(), 0.0
  for i in order:
    keep.add(i)
    mass += p[i]
    if mass >= top_p - 1e-12:
      break
  return [p[i] if i in keep else 0.0 for i in range(len(p))]


def _segment_tokens(variants: list[list[str]], weights: list[float], chosen: int, k: int) -> list[Token]:
  out = []
  toks = variants[chosen]
  for j, tok in enumerate(toks):
    groups: dict[str, float] = {}
    for v, w in zip(variants, weights):
      if v[:j] == toks[:j] and len(v) > j:
        groups[v[j]] = groups.get(v[j], 0.0) + w
    z = sum(groups.values())
    top = sorted(((t, math.log(m / z)) for t, m in groups.items()), key=lambda x: -x[1])[:k]
    out.append(Token(tok, math.log(groups[tok] / z), top))
  return out


def respond(question: str, *, temperature: float = 1.0, top_p: float = 1.0, rng: random.Random,
            top_logprobs: int = 0) -> list[Token]:
  """One sampled response to `question`, as tokens with logprobs (and top-`top_logprobs`)."""
  tokens: list[Token] = []
  for seg in _segments(question):
    weights = list(WEIGHTS[:len(seg)])
    z = sum(weights)
    weights = [w / z for w in weights]
    probs = _sampling_probs(weights, temperature, top_p)
    chosen = rng.choices(range(len(seg)), weights=probs)[0]
    tokens += _segment_tokens([tokenize(p) for p in seg], weights, chosen, max(top_logprobs, 1))
  return tokens


def last_user_text(messages: list[dict]) -> str:
  for m in reversed(messages):
    if m.get("role") == "user":
      c = m.get("content")
      return c if isinstance(c, str) else " ".join(p.get("text", "") for p in c or [] if isinstance(p, dict))
  return ""


def unrecognised(prompts: list[dict]) -> int:
  """How many prompts ({"messages": [...]}) are not problems of the generator: those get the naive
  answer (the sum of their numbers), not a real one."""
  return sum(problems.parse(last_user_text(p["messages"])) is None for p in prompts)


def count_tokens(messages: list[dict]) -> int:
  return sum(3 + len(tokenize(m.get("content") if isinstance(m.get("content"), str) else ""))
             for m in messages) + 3


class SyntheticBackend:
  """The serve_teacher backend around `respond`: n choices per request, seeded or not."""
  model_name = MODEL_NAME

  def count_tokens(self, messages: list[dict]) -> int:
    return count_tokens(messages)

  async def complete(self, messages, *, n=1, temperature=1.0, top_p=1.0, max_tokens=None, seed=None,
                     stop=(), top_logprobs=0) -> list[Choice]:
    question = last_user_text(messages)
    out = []
    for i in range(n):
      rng = random.Random(f"{seed}:{i}:{question}") if seed is not None else random.Random()
      tokens = respond(question, temperature=temperature, top_p=top_p, rng=rng, top_logprobs=top_logprobs)
      out.append(truncate(tokens, max_tokens, list(stop)))
    return out
