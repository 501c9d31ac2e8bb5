"""Batch mode of `collect`: the OpenAI Batch API (about half the price, results within a day).

One request per missing sample, `custom_id` = its corpus id. Steps: write the request file
<collect>/batch_input_<k>.jsonl, upload it (purpose "batch"), create the batch, poll it, download
its output and error files, and merge them into the corpus and failed.jsonl under the same ids.
<collect>/batches.json records every uploaded input file (before its batch is created), its batch
and whether it has been merged, so a restarted run polls the batches already in flight instead of
paying for them twice. An input recorded without a batch (the run died around `batches.create`) is
looked up in the server's batch list by input file id and adopted; only if none is found is its
batch created then.
"""
from __future__ import annotations

import asyncio
import io
import json
import random
import time

from absl import logging
from etils import epath

from proxykd.errors import UserError
from proxykd.teacher import collector, limits, staging

STATE_FILE = "batches.json"
TERMINAL = ("completed", "failed", "expired", "cancelled")


def load_state(collect_dir: epath.PathLike) -> dict:
  path = epath.Path(collect_dir) / STATE_FILE
  if not path.exists():
    return {"batches": []}
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:
    raise UserError(f"{path}: not valid JSON ({e}); it records the batches in flight, fix or remove it") from None


def save_state(collect_dir: epath.PathLike, state: dict) -> None:
  staging.write_text(epath.Path(collect_dir) / STATE_FILE, json.dumps(state, indent=1))


def _request_ids(path: epath.Path) -> set[str]:
  with path.open("r", encoding="utf-8") as f:
    return {json.loads(line)["custom_id"] for line in f if line.strip()}


def sample_jobs(jobs: list[collector.Job]) -> dict[str, collector.Job]:
  """One single-sample job per missing id."""
  return {i: collector.Job(j.messages, j.meta, [s], [i]) for j in jobs for s, i in zip(j.samples, j.ids)}


class BatchRunner:
  def __init__(self, client, params: dict, sink: collector.Sink, cfg, collect_dir: epath.PathLike, *,
               policy: limits.RetryPolicy, max_tokens_key: str = "max_tokens",
               reach: limits.Reachability | None = None):
    self.client, self.params, self.sink, self.cfg = client, params, sink, cfg
    self.dir = epath.Path(collect_dir)
    self.policy, self.max_tokens_key, self.reach = policy, max_tokens_key, reach
    self.rng = random.Random(0)
    self.state = load_state(collect_dir)

  async def _call(self, fn):
    out = await limits.call_with_retries(fn, self.policy, self.rng, self.sink.stats.calls, self.reach)
    if isinstance(out, limits.Failure):
      raise UserError(f"batch mode: the API refused a call ({out.status_code} {out.type}): {out.message}")
    return out

  async def _find_batch(self, input_file_id: str):
    """The server's batch on `input_file_id`, if any (all pages of GET /batches)."""
    page = await self._call(lambda: self.client.batches.list(limit=100))
    while True:
      for batch in page.data:
        if batch.input_file_id == input_file_id:
          return batch
      if not page.has_next_page():
        return None
      page = await self._call(page.get_next_page)

  async def _create(self, b: dict) -> None:
    """Create the batch of the uploaded input recorded in `b`, and record it."""
    batch = await self._call(lambda: self.client.batches.create(
        input_file_id=b["input_file_id"], endpoint="/v1/chat/completions", completion_window=self.cfg.completion_window,
        metadata={"source": "proxykd collect"}))
    b.update(id=batch.id, status=batch.status)
    save_state(self.dir, self.state)
    logging.info("batch mode: created %s with %d requests", batch.id, b["num_requests"])

  async def _reconcile(self) -> None:
    """Give each input recorded without a batch its batch: the server's, if it made one, else a new one."""
    for b in self.state["batches"]:
      if b["id"] is not None or b["merged"]:
        continue
      batch = await self._find_batch(b["input_file_id"])
      if batch is None:
        await self._create(b)
        continue
      b.update(id=batch.id, status=batch.status)
      save_state(self.dir, self.state)
      logging.info("batch mode: adopted %s, created for %s before the last run stopped", batch.id,
                   b["request_file"])

  async def submit(self, jobs: dict[str, collector.Job]) -> None:
    """Create batches for the jobs not already in an unmerged batch."""
    await self._reconcile()
    in_flight = set()
    for b in self.state["batches"]:
      if not b["merged"]:
        in_flight |= _request_ids(self.dir / b["request_file"])
    todo = [i for i in jobs if i not in in_flight]
    for start in range(0, len(todo), self.cfg.max_requests):
      chunk = todo[start:start + self.cfg.max_requests]
      k = len(self.state["batches"])
      path = self.dir / f"batch_input_{k}.jsonl"
      lines = [json.dumps({"custom_id": i, "method": "POST", "url": "/v1/chat/completions",
                           "body": collector.request_body(self.params, jobs[i].messages, jobs[i].samples,
                                                               self.max_tokens_key)})
               for i in chunk]
      data = ("\n".join(lines) + "\n").encode("utf-8")
      path.write_bytes(data)
      upload = await self._call(lambda: self.client.files.create(file=(path.name, io.BytesIO(data)), purpose="batch"))
      # Recorded before the batch exists: a crash from here on is reconciled, not paid twice.
      b = {"id": None, "input_file_id": upload.id,
           "request_file": path.name,  # relative: the workdir may move
           "num_requests": len(chunk), "status": "uploaded", "merged": False}
      self.state["batches"].append(b)
      save_state(self.dir, self.state)
      await self._create(b)
      self.sink.stats.requests += len(chunk)

  async def _download(self, file_id: str | None) -> list[dict]:
    if not file_id:
      return []
    content = await self._call(lambda: self.client.files.content(file_id))
    return [json.loads(line) for line in content.text.splitlines() if line.strip()]

  def _merge_lines(self, lines: list[dict], jobs: dict[str, collector.Job], present: set[str]) -> None:
    for line in lines:
      cid = line.get("custom_id")
      job = jobs.get(cid)
      if job is None or cid in present:
        continue  # Already merged (or no longer wanted: a changed prompt set).
      resp = line.get("response") or {}
      body = resp.get("body") or {}
      if resp.get("status_code") == 200 and body.get("choices"):
        recs = collector.records(body, job, self.params)
        self.sink.add(recs, [], body.get("usage"))
      else:
        err = body.get("error") or line.get("error") or {}
        failure = limits.Failure(resp.get("status_code"), str(err.get("type") or err.get("code") or "BatchError"),
                                 str(err.get("message") or "the batch returned no result for this request"))
        self.sink.add([], collector.failure_records(job, self.params, failure))
      present.add(cid)

  async def wait_and_merge(self, jobs: dict[str, collector.Job], present: set[str]) -> None:
    deadline = time.monotonic() + self.cfg.timeout_h * 3600
    while True:
      pending = [b for b in self.state["batches"] if not b["merged"]]
      if not pending:
        return
      for b in pending:
        batch = await self._call(lambda: self.client.batches.retrieve(b["id"]))
        b["status"] = batch.status
        if batch.status not in TERMINAL:
          continue
        if batch.errors and batch.errors.data:
          logging.warning("batch %s %s: %s", b["id"], batch.status, [e.message for e in batch.errors.data][:5])
        self._merge_lines(await self._download(batch.output_file_id), jobs, present)
        self._merge_lines(await self._download(batch.error_file_id), jobs, present)
        self.sink.writer.sync()
        self.sink.failed.sync()
        b["merged"] = True
        save_state(self.dir, self.state)
      if time.monotonic() > deadline:
        raise UserError(f"batch mode: batches still running after {self.cfg.timeout_h} h; rerun to resume "
                               f"polling them ({self.dir / STATE_FILE})")
      if any(not b["merged"] for b in self.state["batches"]):
        await asyncio.sleep(self.cfg.poll_s)

  async def run(self, jobs: list[collector.Job], present: set[str]) -> None:
    by_id = sample_jobs(jobs)
    await self.submit(by_id)
    await self.wait_and_merge(by_id, present)
