"""Scoring text under a model: per-token and per-sequence log-likelihood of (messages, response).

Input: JSON lines with `messages` (an OpenAI chat list; or `prompt`, a string that becomes the user
turn) and `response` (the assistant's reply to score); anything else on the line (`id`, `meta`,
...) is ignored, so a teacher corpus is valid input. `finish_reason: "length"` scores the
response without the end-of-turn token, as training does; otherwise it is scored too.

Output: one line per input line, in order: `line`, `id` (when the input has one), `tokens` (each
response token's text), `token_ids`, `logprobs`, `sum_logprob`, `num_tokens`, `mean_logprob`,
`top1` (how many tokens were the model's argmax), `cut_prompt` / `cut_response` (tokens removed to
fit the sequence length). The summary: tokens, NLL per token, perplexity, mean per-sequence log-prob.
"""
from __future__ import annotations

import math
from typing import Sequence

from proxykd.eval import jsonl, loglik
from proxykd.errors import UserError

_ROLES = ("system", "user", "assistant", "developer", "tool")


def parse_line(obj: dict, where: str) -> dict:
  """A scoring input line -> a record {messages, response, finish_reason, id?}; UserError naming
  `where` otherwise."""
  msgs = obj.get("messages")
  if msgs is None and isinstance(obj.get("prompt"), str):
    msgs = [{"role": "user", "content": obj["prompt"]}]
  if not (isinstance(msgs, list) and msgs and all(
      isinstance(m, dict) and m.get("role") in _ROLES and isinstance(m.get("content"), str) for m in msgs)):
    raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}} (roles "
                    f"{_ROLES}), or `prompt` a string; got {str(msgs)[:80]!r}")
  if not isinstance(obj.get("response"), str):
    raise UserError(f"{where}: `response` must be a string; the line has {sorted(obj)}")
  rec = {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs],
         "response": obj["response"], "finish_reason": obj.get("finish_reason") or "stop"}
  if "id" in obj:
    rec["id"] = obj["id"]
  return rec


def load_inputs(path) -> list[dict]:
  return jsonl.read_lines(path, parse_line)


def output_rows(records: Sequence[dict], scored: Sequence[loglik.Scored | None]) -> list[dict]:
  rows = []
  for i, (rec, s) in enumerate(zip(records, scored)):
    row = {"line": i + 1, **({"id": rec["id"]} if "id" in rec else {})}
    if s is None:
      row.update(tokens=[], token_ids=[], logprobs=[], sum_logprob=0.0, num_tokens=0,
                 mean_logprob=None, top1=0, cut_prompt=0, cut_response=0)
    else:
      row.update(tokens=s.tokens, token_ids=s.token_ids, logprobs=s.logprobs,
                 sum_logprob=s.sum_logprob, num_tokens=s.num_tokens,
                 mean_logprob=s.sum_logprob / s.num_tokens, top1=int(sum(s.top1)),
                 cut_prompt=s.cut_prompt, cut_response=s.cut_response)
    rows.append(row)
  return rows


def summary(rows: Sequence[dict]) -> dict:
  tokens = sum(r["num_tokens"] for r in rows)
  total = sum(r["sum_logprob"] for r in rows)
  scored = [r for r in rows if r["num_tokens"]]
  nll = -total / tokens if tokens else float("nan")
  return {"lines": len(rows), "scored_lines": len(scored), "tokens": tokens,
          "nll_per_token": nll, "perplexity": math.exp(nll) if tokens else float("nan"),
          "top1": sum(r["top1"] for r in rows) / tokens if tokens else float("nan"),
          "mean_sequence_logprob": sum(r["sum_logprob"] for r in scored) / max(len(scored), 1),
          "cut": sum(1 for r in rows if r["cut_prompt"] or r["cut_response"])}
