"""Stage prior: counts the training splits only (never held-out), records the tokenizer, is a
no-op when its inputs are unchanged, rebuilds on demand, refuses bad settings by key."""
import json

import pytest

import sft_fixtures
from configs import prior as prior_config
from proxykd import runner
from proxykd.data import corpus, split
from proxykd.estimator import store
from proxykd.models.tokenizer import fingerprint, load_tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = tmp_path_factory.mktemp("run")
  records = sft_fixtures.synthetic_records(120, seed=7)
  sft_fixtures.write_corpus(d / "collect" / corpus.CORPUS_FILENAME, records)
  sft_fixtures.demo_tokenizer(d / "tokenizer" / "hf", records)
  return d, records


def _config(**kw):
  c = prior_config.get_config("order=3")
  c.split.heldout = 0.2
  c.progress_bar = False
  c.update(kw)
  return c


def test_prior_counts_the_training_splits_never_the_held_out_slice(workdir):
  d, records = workdir
  runner.run(_config(), str(d))
  tokenizer = load_tokenizer(d / "tokenizer" / "hf")
  counts, meta = store.load(d / "prior", tokenizer, "demo", "no_eos")
  parts = split.split_records(records, _config().split)
  held = [r["id"] for r in parts["heldout"]]
  train = [r["id"] for s in split.SPLITS for r in parts[s]]
  assert held and (counts.response_start(held) == -1).all()
  assert (counts.response_start(train) > 0).all()  # each response starts after its prompt
  assert meta["tokenizer_fingerprint"] == fingerprint(tokenizer) and meta["max_order"] == 3
  summary = json.loads((d / "prior" / "summary.json").read_text())
  assert summary["records"] == len(train) and 0 < summary["heldout_nats_per_token"] < 10

  before = (d / "prior" / store.COUNTS).stat().st_mtime_ns
  runner.run(_config(), str(d))  # same inputs: nothing rebuilt
  assert (d / "prior" / store.COUNTS).stat().st_mtime_ns == before
  runner.run(_config(force=True), str(d))  # rebuilt in place
  assert (d / "prior" / store.COUNTS).stat().st_mtime_ns != before


@pytest.mark.parametrize("key,value,message", [
    ("splits", ("warmup", "heldout"), "config.splits"),
    ("order", 5, "config.order=5"),
    ("smoothing", "kn", "config.smoothing"),
])
def test_bad_settings_are_refused_by_key(workdir, key, value, message):
  d, _ = workdir
  with pytest.raises(runner.UserError, match=message):
    runner.run(_config(**{key: value}), str(d / "elsewhere"))
