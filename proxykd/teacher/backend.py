"""What a serve_teacher backend returns: choices as tokens with logprobs, and OpenAI's `stop`/`max_tokens`.

A backend has `model_name`, `count_tokens(messages) -> int` and
`async complete(messages, *, n, temperature, top_p, max_tokens, seed, stop, top_logprobs) -> [Choice]`.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Token:
  text: str
  logprob: float
  top: list[tuple[str, float]]  # the most likely tokens at this position, best first


@dataclasses.dataclass
class Choice:
  tokens: list[Token]
  finish_reason: str  # "stop" | "length"

  @property
  def text(self) -> str:
    return "".join(t.text for t in self.tokens)


def truncate(tokens: list[Token], max_tokens: int | None, stop: list[str], finish: str = "stop") -> Choice:
  """Apply OpenAI's `stop` (cut before the first stop string, finish 'stop') and `max_tokens`
  (finish 'length'); otherwise the choice ends with `finish`."""
  text = "".join(t.text for t in tokens)
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
  if cut >= 0:
    kept, pos = [], 0
    for t in tokens:
      if pos >= cut:
        break
      kept.append(dataclasses.replace(t, text=t.text[:cut - pos]) if pos + len(t.text) > cut else t)
      pos += len(t.text)
    tokens, finish = kept, "stop"
  if max_tokens is not None and len(tokens) > max_tokens:
    tokens, finish = tokens[:max_tokens], "length"
  return Choice(tokens, finish)
