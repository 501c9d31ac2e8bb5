"""Stage `collect` against the local server over HTTP: retries, failures, logprobs, batch mode."""
import json
import os

import pytest

from configs import collect as collect_config
from proxykd.data import corpus
from proxykd.stages import collect
from proxykd.data import problems
from proxykd.teacher import batch_client, collector, server, serving, synthetic

KEY = "sk-collect-test-key-0123456789"


def make_config(url, n_prompts=40, **teacher):
  c = collect_config.get_config()
  c.progress = False
  c.prompts.num = n_prompts
  c.teacher.update(base_url=url, api_key_env="PROXYKD_TEST_KEY", max_tokens=128, **teacher)
  c.limits.update(concurrency=16, backoff_base_s=0.02, backoff_max_s=0.2)
  c.batch.poll_s = 0.05
  return c


def expected_ids(c, prompts):
  params = collector.teacher_params(c.teacher)
  jobs, _, _ = collector.plan(prompts, params, c.teacher.n, c.teacher.system_prompt, set())
  return {i for j in jobs for i in j.ids}


@pytest.fixture()
def flaky_url(monkeypatch):
  monkeypatch.setenv("PROXYKD_TEST_KEY", KEY)
  faults = server.Faults(error_rate=0.15, drop_rate=0.05, seed=3)
  with serving.BackgroundServer(server.create_app(synthetic.SyntheticBackend(), api_key=KEY, faults=faults,
                                                  max_context=300)) as url:
    yield url


def test_200_prompts_with_20pct_failures_all_collected_once(flaky_url, tmp_path):
  c = make_config(flaky_url, n_prompts=200)
  c.prompts.source = "file"
  rows = [{"question": p.question, "answer": p.answer} for p in problems.generate(200, "train", seed=0)]
  rows.append({"question": "word " * 400, "answer": 0})  # Too long: a permanent 400.
  rows.append(rows[7])  # A repeated prompt is asked once.
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c.prompts.update(path=str(path), meta_fields="answer")
  summary = collect.run(c, str(tmp_path / "wd"))
  out = tmp_path / "wd" / "collect"
  recs = list(corpus.read_corpus(out / "corpus.jsonl"))  # Validates every line; ids unique.
  prompts = [{"messages": [{"role": "user", "content": r["question"]}]} for r in rows[:200]]
  assert {r["id"] for r in recs} == expected_ids(c, prompts) and len(recs) == 200
  assert summary["retries"] >= 20 and {"429", "500", "APIConnectionError"} <= set(summary["errors"])
  assert all(r["response"].endswith(f"#### {r['meta']['answer']}") for r in recs)
  (fail,) = corpus.read_failures(out / corpus.FAILED_FILENAME)
  assert fail["error"]["status_code"] == 400 and "maximum context length" in fail["error"]["message"]
  assert summary["errors"]["400"] == 1  # Permanent: asked once, never retried.
  # A rerun asks only for what is missing: the failed prompt, again refused.
  again = collect.run(c, str(tmp_path / "wd"))
  assert (again["already_present"], again["collected"], again["failed"], again["samples_total"]) == (200, 0, 1, 201)
  assert KEY not in "".join(p.read_text() for p in out.rglob("*") if p.is_file())


def test_top_logprobs_stored_as_the_schema_says(flaky_url, tmp_path):
  c = make_config(flaky_url, n_prompts=12, top_logprobs=3, n=2, seed=5, temperature=1.0)
  collect.run(c, str(tmp_path))
  recs = list(corpus.read_corpus(tmp_path / "collect" / "corpus.jsonl"))
  assert len(recs) == 24 and {r["sample_index"] for r in recs} == {0, 1}
  for r in recs:
    assert r["teacher"]["top_logprobs"] == 3
    assert "".join(t["token"] for t in r["logprobs"]) == r["response"]
    assert r["usage"]["completion_tokens"] == len(r["logprobs"])
    for t in r["logprobs"]:
      assert set(t) == {"token", "logprob", "top_logprobs"} and 1 <= len(t["top_logprobs"]) <= 3
      assert any(u["token"] == t["token"] and u["logprob"] == t["logprob"] for u in t["top_logprobs"])


def test_batch_mode_end_to_end_and_resumable(flaky_url, tmp_path):
  c = make_config(flaky_url, n_prompts=30, n=2)
  c.batch.enabled = True
  c.pricing.update(input_per_1m=2.0, output_per_1m=8.0)
  wd = str(tmp_path / "wd")
  # A run that dies right after creating its batch: the restart polls that batch, creates none.
  prompts = collect.prompts_lib.load_prompts(c.prompts)
  params = collector.teacher_params(c.teacher)
  jobs, _, _ = collector.plan(prompts, params, 2, c.teacher.system_prompt, set())
  out = os.path.join(wd, "collect")
  os.makedirs(out)

  async def submit_only():
    import openai  # pylint: disable=import-outside-toplevel
    client = openai.AsyncOpenAI(base_url=flaky_url, api_key=KEY, max_retries=0)
    with corpus.CorpusWriter(os.path.join(out, "corpus.jsonl")) as w, \
         corpus.CorpusWriter(os.path.join(out, "failed.jsonl"), validate=corpus.validate_failure) as f:
      stats = collector.Stats(total=60)
      sink = collector.Sink(w, f, stats, collector.Progress(stats, False))
      runner = batch_client.BatchRunner(client, params, sink, c.batch, out, policy=collect.limits.RetryPolicy())
      await runner.submit(batch_client.sample_jobs(jobs[:10]))
    await client.close()

  collect.asyncio.run(submit_only())
  summary = collect.run(c, wd)
  state = json.loads(open(os.path.join(out, "batches.json")).read())
  assert len(state["batches"]) == 2 and all(b["merged"] for b in state["batches"])
  assert state["batches"][0]["num_requests"] == 20 and state["batches"][1]["num_requests"] == 40
  recs = list(corpus.read_corpus(os.path.join(out, "corpus.jsonl")))
  assert {r["id"] for r in recs} == expected_ids(c, prompts) and len(recs) == 60
  assert summary["mode"] == "batch" and summary["collected"] == 60
  # Batch pricing: half of the listed prices.
  assert summary["est_cost_usd"] == pytest.approx(
      (summary["prompt_tokens"] * 1.0 + summary["completion_tokens"] * 4.0) / 1e6)
  assert collect.run(c, wd)["collected"] == 0
  assert len(json.loads(open(os.path.join(out, "batches.json")).read())["batches"]) == 2


def test_local_teacher_is_spawned_and_reached_over_http(tmp_path, monkeypatch):
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)
  c = collect_config.get_config("runlocal")
  c.progress = False
  c.prompts.num = 16
  summary = collect.run(c, str(tmp_path))
  assert summary["collected"] == 16 and summary["base_url"] == "local"
  server_info = json.loads((tmp_path / "serve_teacher" / "server.json").read_text())
  assert server_info["base_url"].startswith("http://127.0.0.1:")


def test_missing_key_and_bad_settings_are_user_errors(tmp_path, monkeypatch):
  monkeypatch.delenv("PROXYKD_TEST_KEY", raising=False)
  c = make_config("http://127.0.0.1:9/v1", n_prompts=2)
  with pytest.raises(collect.runner.UserError, match="PROXYKD_TEST_KEY"):
    collect.run(c, str(tmp_path))
  c.teacher.top_logprobs = 25
  with pytest.raises(collect.runner.UserError, match="top_logprobs"):
    collect.run(c, str(tmp_path))


def test_wrong_key_stops_the_run(flaky_url, tmp_path, monkeypatch):
  monkeypatch.setenv("PROXYKD_TEST_KEY", "sk-wrong")
  c = make_config(flaky_url, n_prompts=4)
  with pytest.raises(collect.limits.FatalAPIError, match="401"):
    collect.run(c, str(tmp_path))


def test_dropping_endpoint_stops_after_consecutive_failures(tmp_path, monkeypatch):
  monkeypatch.setenv("PROXYKD_TEST_KEY", KEY)
  # It accepts connections, then drops every one: retried per the budget (not a dead endpoint).
  app = server.create_app(synthetic.SyntheticBackend(), faults=server.Faults(drop_rate=1.0))
  with serving.BackgroundServer(app) as url:
    c = make_config(url, n_prompts=40)
    c.limits.update(max_retries=1, max_consecutive_failures=5, concurrency=1)
    with pytest.raises(collect.limits.FatalAPIError, match="5 requests in a row failed.*APIConnectionError"):
      collect.run(c, str(tmp_path))
  fails = list(corpus.read_failures(tmp_path / "collect" / corpus.FAILED_FILENAME))
  assert len(fails) == 5 and fails[0]["error"]["message"].startswith("gave up after 2 attempts")
