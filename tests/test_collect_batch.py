"""Batch mode survives a crash around `batches.create`: the restart adopts the server's batch, never pays twice."""
import asyncio
import io
import json
import os

import openai
import pytest

from configs import collect as collect_config
from proxykd.data import corpus
from proxykd.stages import collect
from proxykd.teacher import batch_client, collector, limits, server, serving, synthetic

KEY = "sk-batch-crash-test"


class Crash(Exception):
  """The process dying at that point."""


def make_config(url):
  c = collect_config.get_config()
  c.progress = False
  c.prompts.num = 8
  c.teacher.update(base_url=url, api_key_env="PROXYKD_TEST_KEY", max_tokens=128)
  c.batch.update(enabled=True, poll_s=0.05)
  return c


async def _submit_and_crash(url, c, out, when):
  """Submit the collection's batch with `batches.create` dying `when` ("before"/"after") it reaches the server."""
  client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0)
  real_create = client.batches.create

  async def create(**kw):
    if when == "after":
      await real_create(**kw)
    raise Crash()

  client.batches.create = create
  params = collector.teacher_params(c.teacher)
  jobs, _, _ = collector.plan(collect.prompts_lib.load_prompts(c.prompts), params, 1, c.teacher.system_prompt, set())
  try:
    with corpus.CorpusWriter(os.path.join(out, "corpus.jsonl")) as w, \
         corpus.CorpusWriter(os.path.join(out, "failed.jsonl"), validate=corpus.validate_failure) as f:
      stats = collector.Stats(total=len(jobs))
      sink = collector.Sink(w, f, stats, collector.Progress(stats, False))
      runner = batch_client.BatchRunner(client, params, sink, c.batch, out, policy=limits.RetryPolicy())
      await runner.submit(batch_client.sample_jobs(jobs))
  finally:
    await client.close()


@pytest.mark.parametrize("when", ["after", "before"])
def test_crash_around_batch_create_is_reconciled_on_restart(when, tmp_path, monkeypatch):
  monkeypatch.setenv("PROXYKD_TEST_KEY", KEY)
  app = server.create_app(synthetic.SyntheticBackend(), api_key=KEY, max_batches=300)
  with serving.BackgroundServer(app) as url:
    c = make_config(url)
    out = str(tmp_path / "collect")
    os.makedirs(out)
    with pytest.raises(Crash):
      asyncio.run(_submit_and_crash(url, c, out, when))
    (entry,) = json.loads(open(os.path.join(out, "batches.json")).read())["batches"]
    assert entry["id"] is None and entry["input_file_id"].startswith("file-") and entry["num_requests"] == 8
    sync = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    # Newer batches of someone else push ours past the first page of GET /batches (100 a page).
    other = sync.files.create(file=("other.jsonl", io.BytesIO(b"")), purpose="batch")
    for _ in range(101):
      sync.batches.create(input_file_id=other.id, endpoint="/v1/chat/completions", completion_window="24h")

    summary = collect.run(c, str(tmp_path))
    ours = [b for b in sync.batches.list(limit=100) if b.input_file_id == entry["input_file_id"]]
    assert len(ours) == 1  # Adopted after a crash after create; created once after a crash before it.
    (after,) = json.loads(open(os.path.join(out, "batches.json")).read())["batches"]
    assert after["id"] == ours[0].id and after["merged"]
    assert summary["collected"] == 8 and len(list(corpus.read_corpus(os.path.join(out, "corpus.jsonl")))) == 8
