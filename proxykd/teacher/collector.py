"""Asynchronous collection of teacher samples through the official `openai` async client.

`plan` turns prompts into jobs (one request per prompt for the samples it still lacks, so a resumed
run asks only for what is missing); `collect` runs them with a concurrency limit, RPM/TPM limits and
retries (proxykd/teacher/limits.py), appending each answer to the corpus as it arrives.

Seeds: with `teacher.seed` >= 0, sample i of a prompt is requested on its own (n=1) with seed
`teacher.seed + i` (`sample_seed`), so the n samples differ and each is the same whether it is asked
in a first run, a resumed one or a batch. Records keep the configured seed in `teacher.seed`, so
ids stay a function of (messages, teacher parameters as configured, sample index).
"""
from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import Any

from tqdm import tqdm

from proxykd.data import corpus
from proxykd.teacher import limits
from proxykd.teacher.limits import httpx  # The HTTP library of the installed openai client.


@dataclasses.dataclass
class Job:
  messages: list[dict]
  meta: dict
  samples: list[int]  # the sample indices still missing
  ids: list[str]  # their record ids


def teacher_params(t: Any) -> dict:
  """The `teacher` field of every record: model and sampling parameters (these enter the ids)."""
  stop = [s for s in (t.stop if isinstance(t.stop, (list, tuple)) else [t.stop]) if s]
  return {"model": t.model, "temperature": float(t.temperature), "top_p": float(t.top_p),
          "max_tokens": int(t.max_tokens) if t.max_tokens > 0 else None,
          "seed": int(t.seed) if t.seed >= 0 else None, "stop": stop or None,
          "top_logprobs": int(t.top_logprobs)}


def sample_seed(params: dict, sample_index: int) -> int | None:
  """The seed sent for sample `sample_index` of a prompt: the configured seed + the index (None: unseeded)."""
  return None if params["seed"] is None else params["seed"] + sample_index


def with_system(messages: list[dict], system_prompt: str) -> list[dict]:
  if not system_prompt or (messages and messages[0]["role"] in ("system", "developer")):
    return messages
  return [{"role": "system", "content": system_prompt}] + messages


def plan(prompts: list[dict], params: dict, n: int, system_prompt: str,
         present: set[str]) -> tuple[list[Job], int, int]:
  """(jobs for the samples not in `present`, how many were already there, distinct samples wanted).

  A prompt repeated in the source has the same ids: it is asked for once. With a seed, each missing
  sample is a job of its own (its own seed, `sample_seed`); without, one job asks for all of them.
  """
  jobs, already, seen = [], 0, set()
  for p in prompts:
    msgs = with_system(p["messages"], system_prompt)
    ids = [corpus.record_id(msgs, params, i) for i in range(n)]
    if ids[0] in seen:
      continue
    seen.add(ids[0])
    missing = [i for i in range(n) if ids[i] not in present]
    already += n - len(missing)
    groups = [[i] for i in missing] if params["seed"] is not None else [missing] if missing else []
    jobs += [Job(msgs, p.get("meta", {}), g, [ids[i] for i in g]) for g in groups]
  return jobs, already, len(seen) * n


def request_body(params: dict, messages: list[dict], samples: list[int], max_tokens_key: str = "max_tokens") -> dict:
  """The chat.completions arguments asking for the sample indices `samples` of a prompt (also the body
  of a batch request line). Seeded requests ask for one sample, with its own seed."""
  if params["seed"] is not None and len(samples) != 1:
    raise ValueError(f"a seeded request asks for one sample (its seed is seed + index), not {samples}")
  body = {"model": params["model"], "messages": messages, "temperature": params["temperature"],
          "top_p": params["top_p"]}
  if len(samples) != 1:
    body["n"] = len(samples)
  seed = sample_seed(params, samples[0])
  for key, value in ((max_tokens_key, params["max_tokens"]), ("seed", seed), ("stop", params["stop"])):
    if value is not None:
      body[key] = value
  if params["top_logprobs"] > 0:
    body.update(logprobs=True, top_logprobs=params["top_logprobs"])
  return body


def _logprobs(choice: dict) -> list[dict] | None:
  content = (choice.get("logprobs") or {}).get("content")
  if content is None:
    return None
  return [{"token": t["token"], "logprob": float(t["logprob"]),
           "top_logprobs": [{"token": u["token"], "logprob": float(u["logprob"])} for u in t.get("top_logprobs") or []]}
          for t in content]


def records(completion: dict, job: Job, params: dict) -> list[dict]:
  """Corpus records for the choices of one chat completion (OpenAI's JSON), one per missing sample.

  usage: each record carries the request's prompt_tokens; completion tokens are per choice when
  logprobs give them, else the request's total split evenly.
  """
  choices = sorted(completion.get("choices") or [], key=lambda c: c.get("index", 0))[:len(job.samples)]
  usage = completion.get("usage") or {}
  prompt_tokens, total_completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
  out = []
  for k, ch in enumerate(choices):
    lps = _logprobs(ch) if params["top_logprobs"] > 0 else None
    comp = len(lps) if lps is not None else total_completion // len(choices) + (k < total_completion % len(choices))
    rec = {"id": job.ids[k], "messages": job.messages, "response": (ch.get("message") or {}).get("content") or "",
           "sample_index": job.samples[k], "teacher": params, "finish_reason": ch.get("finish_reason"),
           "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": comp, "total_tokens": prompt_tokens + comp},
           "logprobs": lps}
    if job.meta:
      rec["meta"] = job.meta
    out.append(rec)
  return out


def failure_records(job: Job, params: dict, failure: limits.Failure, sample_range=None) -> list[dict]:
  idx = range(len(job.samples)) if sample_range is None else sample_range
  return [{"id": job.ids[k], "messages": job.messages, "sample_index": job.samples[k], "teacher": params,
           "meta": job.meta, "status": "failed", "error": failure.to_json()} for k in idx]


@dataclasses.dataclass
class Stats:
  total: int  # samples wanted in all
  already: int = 0
  done: int = 0
  failed: int = 0
  requests: int = 0
  prompt_tokens: int = 0
  completion_tokens: int = 0
  price_in: float = 0.0  # USD per 1M tokens
  price_out: float = 0.0
  calls: limits.CallStats = dataclasses.field(default_factory=limits.CallStats)

  @property
  def remaining(self) -> int:
    return self.total - self.already - self.done - self.failed

  @property
  def cost(self) -> float:
    return (self.prompt_tokens * self.price_in + self.completion_tokens * self.price_out) / 1e6


class Progress:
  """tqdm bar over samples: done / failed / remaining, retries, tokens and estimated cost; shown from
  the start (before any answer) and redrawn by `refresh` while nothing completes."""

  def __init__(self, stats: Stats, enabled: bool, desc: str = "collect"):
    self.stats = stats
    self.bar = tqdm(total=stats.total, initial=stats.already, desc=desc, unit="sample", disable=not enabled,
                    dynamic_ncols=True, mininterval=0.5)
    self.refresh()

  def _postfix(self) -> None:
    s = self.stats
    self.bar.set_postfix(done=s.done, failed=s.failed, remaining=s.remaining, retries=s.calls.retries,
                         tokens=s.prompt_tokens + s.completion_tokens, cost=f"${s.cost:.4f}", refresh=False)

  def update(self, k: int) -> None:
    self._postfix()
    self.bar.update(k)

  def refresh(self) -> None:
    self._postfix()
    self.bar.refresh()

  async def tick(self, every_s: float = 1.0) -> None:
    """Redraw every `every_s` seconds (elapsed time, retries) until cancelled."""
    while True:
      await asyncio.sleep(every_s)
      self.refresh()

  def close(self) -> None:
    self._postfix()
    self.bar.close()


class Sink:
  """Where results go: the corpus (successes) and failed.jsonl, with stats and progress kept in step."""

  def __init__(self, writer: corpus.CorpusWriter, failed: corpus.CorpusWriter, stats: Stats, progress: Progress):
    self.writer, self.failed, self.stats, self.progress = writer, failed, stats, progress

  def add(self, recs: list[dict], fails: list[dict], usage: dict | None = None) -> None:
    for r in recs:
      self.writer.write(r)
    for f in fails:
      self.failed.write(f)
    s = self.stats
    s.done += len(recs)
    s.failed += len(fails)
    if usage:
      s.prompt_tokens += int(usage.get("prompt_tokens") or 0)
      s.completion_tokens += int(usage.get("completion_tokens") or 0)
    self.progress.update(len(recs) + len(fails))


async def create(client, body: dict):
  """POST /chat/completions through the client's generic `post` (its documented way to send raw
  bodies): same transport, auth, timeouts and error classes as `chat.completions.create`, minus the
  typed transform of the arguments and pydantic parsing of the reply, which cost ~2 ms of CPU per
  request and capped throughput below 128 req/s on a 2-core machine. Returns the HTTP response."""
  return await client.post("/chat/completions", body=body, cast_to=httpx.Response)


async def collect(client, jobs: list[Job], params: dict, sink: Sink, *, concurrency: int,
                  limiter: limits.RateLimiter, policy: limits.RetryPolicy, max_tokens_key: str = "max_tokens",
                  ramp_up_s: float = 0.0, max_consecutive_failures: int = 0, seed: int = 0,
                  reach: limits.Reachability | None = None) -> None:
  """Run `jobs` against `client` (an openai.AsyncOpenAI with max_retries=0) into `sink`.

  The workers start spread over `ramp_up_s`: started together they would stay in lock-step bursts
  (every reply of a fixed-latency server arriving at once), each burst queueing on the CPU.
  `reach` stops the run early when the endpoint never answers (limits.Reachability);
  `max_consecutive_failures` (> 0) stops it when that many requests in a row failed for good: an
  endpoint that goes down should not turn the whole prompt set into failed.jsonl lines.
  """
  it = iter(jobs)
  rng = random.Random(seed)
  n_workers = max(1, min(concurrency, len(jobs)))
  streak = [0]

  def failed(job: Job, failure: limits.Failure, sample_range=None) -> None:
    sink.add([], failure_records(job, params, failure, sample_range))
    streak[0] += 1
    if 0 < max_consecutive_failures <= streak[0]:
      raise limits.FatalAPIError(f"{streak[0]} requests in a row failed; the last: {failure.status_code} "
                                 f"{failure.type}: {failure.message} (limits.max_consecutive_failures)")

  async def worker(k: int):
    await asyncio.sleep(ramp_up_s * k / n_workers)
    for job in it:  # Shared iterator: each job is taken by exactly one worker.
      body = request_body(params, job.messages, job.samples, max_tokens_key)
      est = sum(len(m["content"]) for m in job.messages) // 4 + (params["max_tokens"] or 256) * len(job.samples)
      await limiter.acquire(est)
      sink.stats.requests += 1
      result = await limits.call_with_retries(lambda: create(client, body), policy, rng, sink.stats.calls, reach)
      if isinstance(result, limits.Failure):
        failed(job, result)
        continue
      try:
        completion = result.json()
      except ValueError:
        failed(job, limits.Failure(result.status_code, "InvalidJSON", f"the reply is not JSON: {result.text[:200]!r}"))
        continue
      recs = records(completion, job, params)
      streak[0] = 0
      sink.add(recs, [], completion.get("usage"))
      if len(recs) < len(job.samples):  # The server returned fewer choices than asked for.
        failed(job, limits.Failure(200, "MissingChoices", f"asked for n={len(job.samples)}, got {len(recs)} choices"),
               range(len(recs), len(job.samples)))

  tasks = [asyncio.ensure_future(worker(k)) for k in range(n_workers)]
  try:
    await asyncio.gather(*tasks)
  finally:
    for t in tasks:
      t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
