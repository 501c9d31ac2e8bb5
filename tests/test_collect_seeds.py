"""teacher.seed: each sample index gets its own seed, the same in async, resumed and batch runs."""
import json

import pytest

from configs import collect as collect_config
from proxykd.data import corpus
from proxykd.stages import collect
from proxykd.teacher import collector, server, serving, synthetic

KEY = "sk-seed-test-key"
MSGS = [{"role": "user", "content": "What is 2 + 3?"}]


class RecordingBackend(synthetic.SyntheticBackend):
  """The synthetic teacher, remembering the (seed, n) of every completion it computes."""

  def __init__(self):
    self.calls = []

  async def complete(self, messages, **kw):
    self.calls.append((kw["seed"], kw["n"]))
    return await super().complete(messages, **kw)


def params(seed):
  t = collect_config.get_config().teacher
  t.seed = seed
  return collector.teacher_params(t)


def test_plan_and_request_bodies_give_each_sample_its_own_seed():
  jobs, _, total = collector.plan([{"messages": MSGS}], params(7), 3, "", set())
  assert total == 3 and [j.samples for j in jobs] == [[0], [1], [2]]
  assert [collector.request_body(params(7), MSGS, j.samples)["seed"] for j in jobs] == [7, 8, 9]
  assert all("n" not in collector.request_body(params(7), MSGS, j.samples) for j in jobs)
  # Resumed with sample 1 present: samples 0 and 2 keep their seeds and ids.
  present = {jobs[1].ids[0]}
  again, already, _ = collector.plan([{"messages": MSGS}], params(7), 3, "", present)
  assert already == 1 and [(j.samples, j.ids) for j in again] == [(j.samples, j.ids) for j in (jobs[0], jobs[2])]
  # Ids hash the configured seed, not the per-sample one.
  assert jobs[1].ids[0] == corpus.record_id(MSGS, params(7), 1) != corpus.record_id(MSGS, params(8), 0)
  # Unseeded: one request for all the samples, no seed sent.
  (job,), _, _ = collector.plan([{"messages": MSGS}], params(-1), 3, "", set())
  body = collector.request_body(params(-1), MSGS, job.samples)
  assert job.samples == [0, 1, 2] and body["n"] == 3 and "seed" not in body
  with pytest.raises(ValueError, match="one sample"):
    collector.request_body(params(7), MSGS, [0, 1])


@pytest.fixture()
def backend_url(monkeypatch):
  monkeypatch.setenv("PROXYKD_TEST_KEY", KEY)
  backend = RecordingBackend()
  with serving.BackgroundServer(server.create_app(backend, api_key=KEY)) as url:
    yield backend, url


def make_config(url, batch=False):
  c = collect_config.get_config()
  c.progress = False
  c.prompts.num = 6
  c.teacher.update(base_url=url, api_key_env="PROXYKD_TEST_KEY", max_tokens=128, n=3, seed=5, temperature=1.0)
  c.batch.update(enabled=batch, poll_s=0.05)
  return c


def responses(path):
  return {r["id"]: (r["sample_index"], r["response"], r["teacher"]["seed"]) for r in corpus.read_corpus(path)}


def test_seeded_samples_differ_and_are_reproduced_on_resume_and_in_batch_mode(backend_url, tmp_path):
  backend, url = backend_url
  path = tmp_path / "a" / "collect" / "corpus.jsonl"
  collect.run(make_config(url), str(tmp_path / "a"))
  first = responses(path)
  assert len(first) == 18 and {s for _, _, s in first.values()} == {5}  # Records keep the configured seed.
  assert sorted(backend.calls) == sorted([(5, 1), (6, 1), (7, 1)] * 6)
  by_prompt = {}
  for r in corpus.read_corpus(path):
    by_prompt.setdefault(r["messages"][-1]["content"], []).append(r["response"])
  assert any(len(set(rs)) > 1 for rs in by_prompt.values())  # Identical seeds would give identical samples.

  # Resume after losing sample 1 of every prompt: only seed 6 is asked for, and gives the same answers.
  lines = path.read_text().splitlines()
  path.write_text("".join(line + "\n" for line in lines if json.loads(line)["sample_index"] != 1))
  backend.calls.clear()
  assert collect.run(make_config(url), str(tmp_path / "a"))["collected"] == 6
  assert backend.calls == [(6, 1)] * 6 and responses(path) == first

  # Batch mode: the same seeds per sample index, hence the same records.
  backend.calls.clear()
  collect.run(make_config(url, batch=True), str(tmp_path / "b"))
  assert sorted(backend.calls) == sorted([(5, 1), (6, 1), (7, 1)] * 6)
  assert responses(tmp_path / "b" / "collect" / "corpus.jsonl") == first
