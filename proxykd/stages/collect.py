"""Stage `collect`: prompts -> teacher (any OpenAI-compatible API) -> <workdir>/collect/corpus.jsonl.

Resumable: ids already in the corpus are skipped, so a killed run restarted with the same config
asks only for what is missing. Writes summary.json at the end (no secrets: the key is read from the
environment variable named by teacher.api_key_env and only handed to the client). Paths go through
etils.epath: with a workdir (or `output`) that is not local, such as gs://..., the corpus and
failed.jsonl are appended to local copies and uploaded at the end (proxykd/teacher/staging.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging as std_logging
import os
import time
from urllib.parse import urlsplit, urlunsplit

import openai
from absl import logging
from etils import epath

from proxykd import runner
from proxykd.data import corpus, prompts as prompts_lib
from proxykd.teacher import batch_client, collector, limits, staging, synthetic
from proxykd.teacher.local import LocalTeacher


def _check(config) -> None:
  t, lim = config.teacher, config.limits
  if not 0 <= t.top_logprobs <= 20:
    raise runner.UserError(f"teacher.top_logprobs={t.top_logprobs} must be in 0..20")
  if t.n < 1:
    raise runner.UserError(f"teacher.n={t.n} must be >= 1")
  if lim.concurrency < 1:
    raise runner.UserError(f"limits.concurrency={lim.concurrency} must be >= 1")
  if not t.model:
    raise runner.UserError("teacher.model is empty")


def _safe_url(url: str) -> str:
  """The URL without user:password@ (which would be a secret)."""
  parts = urlsplit(url)
  return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))) \
      if parts.hostname else url


def _warn_synthetic_teacher(config, all_prompts: list[dict]) -> None:
  """The built-in synthetic teacher knows only its own generator's problems: say so for any others."""
  if config.teacher.base_url != "local" or config.local.backend != "synthetic":
    return
  bad = synthetic.unrecognised(all_prompts)
  if bad:
    logging.warning("collect: %d of %d prompts (prompts.source=%s) are not the synthetic teacher's own arithmetic "
                    "problems, and teacher.base_url=local serves the synthetic teacher (local.backend=synthetic): "
                    "it answers them with the sum of their numbers, i.e. nonsense. Set teacher.base_url (and "
                    "teacher.model) to a real OpenAI-compatible API, or local.backend=model.",
                    bad, len(all_prompts), config.prompts.source)


def _api_key(t) -> str:
  key = os.environ.get(t.api_key_env, "") if t.api_key_env else ""
  if not key:
    raise runner.UserError(f"teacher.api_key_env={t.api_key_env!r}: that environment variable is empty; "
                           "export the key there (or set teacher.base_url=local for the built-in teacher)")
  return key


async def _run(config, base_url: str, key: str, collect_dir: epath.Path, out_path: str, failed_path: str,
               all_prompts: list[dict]) -> dict:
  """Collect into the local files `out_path` (corpus) and `failed_path`; side files go to `collect_dir`."""
  t = config.teacher
  client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0,
                              timeout=openai.Timeout(t.timeout_s, connect=min(t.timeout_s, t.connect_timeout_s)))
  reach = limits.Reachability(_safe_url(base_url), config.limits.connect_grace_s)
  params = collector.teacher_params(t)
  present = corpus.corpus_ids(out_path)
  jobs, already, total = collector.plan(all_prompts, params, t.n, t.system_prompt, present)
  if total < len(all_prompts) * t.n:
    logging.warning("collect: %d prompts are repeats of earlier ones; each is asked once",
                    len(all_prompts) - total // t.n)
  discount = config.pricing.batch_discount if config.batch.enabled else 1.0
  stats = collector.Stats(total=total, already=already,
                          price_in=config.pricing.input_per_1m * discount,
                          price_out=config.pricing.output_per_1m * discount)
  policy = limits.RetryPolicy(config.limits.max_retries, config.limits.backoff_base_s, config.limits.backoff_max_s,
                              config.limits.retry_after_max_s)
  logging.info("collect: %d prompts x %d samples; %d already in %s; %d requests to make", len(all_prompts), t.n,
               already, out_path, len(jobs))
  progress = collector.Progress(stats, config.progress)
  ticker = asyncio.ensure_future(progress.tick())
  start = time.monotonic()
  with corpus.CorpusWriter(out_path, sync_every=config.limits.sync_every, background_fsync=True) as writer, \
       corpus.CorpusWriter(failed_path, sync_every=1, validate=corpus.validate_failure) as failed:
    sink = collector.Sink(writer, failed, stats, progress)
    try:
      if config.batch.enabled:
        await batch_client.BatchRunner(client, params, sink, config.batch, collect_dir, policy=policy,
                                       max_tokens_key=t.max_tokens_key, reach=reach).run(jobs, set(present))
      else:
        await collector.collect(client, jobs, params, sink, concurrency=config.limits.concurrency,
                                limiter=limits.RateLimiter(config.limits.rpm, config.limits.tpm), policy=policy,
                                max_tokens_key=t.max_tokens_key, ramp_up_s=config.limits.ramp_up_s,
                                max_consecutive_failures=config.limits.max_consecutive_failures, reach=reach)
    finally:
      ticker.cancel()
      progress.close()
      await client.close()
  elapsed = time.monotonic() - start
  return {"mode": "batch" if config.batch.enabled else "async", "model": t.model, "corpus": out_path,
          "prompts": len(all_prompts), "samples_per_prompt": t.n, "samples_total": stats.total,
          "already_present": already, "collected": stats.done, "failed": stats.failed,
          "corpus_total": already + stats.done, "requests": stats.requests, "retries": stats.calls.retries,
          "errors": stats.calls.errors, "prompt_tokens": stats.prompt_tokens,
          "completion_tokens": stats.completion_tokens, "est_cost_usd": round(stats.cost, 6),
          "elapsed_s": round(elapsed, 3), "requests_per_s": round(stats.requests / elapsed, 3) if elapsed else None}


def run(config, workdir):
  _check(config)
  for name in ("httpx", "httpx2", "openai"):  # One INFO line per HTTP request is too much.
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  t = config.teacher
  collect_dir = runner.stage_dir(workdir, "collect")
  collect_dir.mkdir(parents=True, exist_ok=True)
  out_path = epath.Path(config.output) if config.output else collect_dir / corpus.CORPUS_FILENAME
  all_prompts = prompts_lib.load_prompts(config.prompts)
  if not all_prompts:
    raise runner.UserError("collect: the prompt source gave no prompts (check prompts.* and limit/offset)")
  _warn_synthetic_teacher(config, all_prompts)
  base_url, key = (None, None) if t.base_url == "local" else (t.base_url, _api_key(t))
  staged = [out_path, collect_dir / corpus.FAILED_FILENAME]
  if t.base_url == "local":
    staged.append(collect_dir / "local_teacher.log")
  with contextlib.ExitStack() as stack:
    local_out, local_failed, *local_log = stack.enter_context(staging.local_copies(staged))
    if t.base_url == "local":
      base_url, key = stack.enter_context(LocalTeacher(config.local, workdir, local_log[0], t.model))
    summary = asyncio.run(_run(config, base_url, key, collect_dir, local_out, local_failed, all_prompts))
  summary["corpus"] = str(out_path)
  summary["base_url"] = "local" if t.base_url == "local" else _safe_url(base_url)
  staging.write_text(collect_dir / "summary.json", json.dumps(summary, indent=2))
  logging.info("collect: %s", summary)
  print(json.dumps(summary))
  return summary
