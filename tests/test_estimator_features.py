"""The prior as per-batch features of packed rows: histories from rows equal the counted ones
(leave-one-out joins exactly), held-out rows, the refusals, and the prior store's tokenizer check."""
import numpy as np
import pytest

import sft_fixtures
from proxykd.data import batches, pipeline, split, tokenize
from proxykd.estimator import build, features, store
from proxykd.estimator.prior import PriorView
from proxykd.models.tokenizer import build_demo_tokenizer, fingerprint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  records = sft_fixtures.synthetic_records(80, seed=3)
  tokenizer = sft_fixtures.demo_tokenizer(tmp_path_factory.mktemp("tok"), records)
  cfg = split.default_config()
  cfg.heldout = 0.2
  parts = split.split_records(records, cfg)
  train = [r for s in split.SPLITS for r in parts[s]]
  counts = build.counts_from_records(train, tokenizer, max_order=3)
  return parts, train, tokenizer, counts


def _direct(view, tokenizer, records, loo):
  """{(record id, offset): pi} from each record's full tokenisation (no packing)."""
  responses, ids, starts = build.response_tokens(records, tokenizer)
  out = {}
  for resp, rid, start in zip(responses, ids, starts):
    padded = np.concatenate([np.full(view.order - 1, len(tokenizer)), resp])
    hist = np.stack([padded[i:i + view.order - 1] for i in range(len(resp))])
    sparse = view.query(hist, resp, loo=loo)
    for i in range(len(resp)):
      out[(rid, start + i)] = {int(t): float(p) for t, p in zip(sparse.ids[i], sparse.probs[i])}
  return out


def _whole_prompt_cut(records, tokenizer, seq_len):
  """Ids of records whose prompt truncate_prompt cuts entirely (the response starts the row)."""
  examples, _ = tokenize.tokenize(records, tokenizer)
  cut, _ = tokenize.truncate(examples, seq_len + 1, "truncate_prompt")
  return {c.id for e, c in zip(examples, cut) if c.start >= int(np.argmax(e.loss_mask))}


@pytest.mark.parametrize("truncation", ["truncate_response", "truncate_prompt"])
def test_features_of_packed_rows_equal_queries_on_the_full_tokenisation(setup, truncation):
  parts, train, tokenizer, counts = setup
  view = PriorView(counts, order=3, k=6, vocab_size=len(tokenizer) + 4, floor=1e-4)
  data = pipeline.default_config()
  data.update(seq_len=40, truncation=truncation)  # short rows: records are cut and packed together
  for records, corpus_rows in ((parts["distill"], True), (parts["heldout"], False)):
    rows, _ = pipeline.build_rows(records, tokenizer, data)
    feature = features.PriorFeature(view, rows.docs, corpus_rows=corpus_rows)
    local = batches.fixed_batches(rows.arrays, 8, features=[feature])
    assert local[0]["prior_ids"].shape == (8, 40, 6) and local[0]["prior_rest"].shape == (8, 40)
    direct = _direct(view, tokenizer, records, loo=corpus_rows)
    # Held-out rows count the response start within the row, which a whole-prompt cut shifts (see
    # features.py); rows of the prior's corpus know it exactly, so they must match everywhere.
    cut = _whole_prompt_cut(records, tokenizer, 40) if truncation == "truncate_prompt" else set()
    if corpus_rows and truncation == "truncate_prompt":
      assert cut  # the exact path is exercised on such records
    checked = 0
    for b in local:
      for r, t in zip(*np.nonzero(b["loss_mask"])):
        key = (rows.docs[b["doc"][r, t]], int(b["offset"][r, t]))
        if not corpus_rows and key[0] in cut:
          continue
        got = dict(zip(b["prior_ids"][r, t].tolist(), b["prior_probs"][r, t].tolist()))
        want = direct[key]
        assert got.keys() == want.keys(), key
        np.testing.assert_allclose([got[i] for i in want], list(want.values()), rtol=1e-6)
        checked += 1
    assert checked > 100
    # Prompt and padding slots hold a proper (uniform) distribution, finite for any kernel.
    off = local[0]["loss_mask"] == 0
    assert np.allclose(local[0]["prior_probs"][off], 1.0 / view.vocab_size)


def test_rows_are_refused_as_the_wrong_kind(setup):
  parts, _, tokenizer, counts = setup
  view = PriorView(counts, order=2, k=4)
  rows, _ = pipeline.build_rows(parts["heldout"], tokenizer, pipeline.default_config())
  with pytest.raises(ValueError, match="not counted in the prior"):
    features.PriorFeature(view, rows.docs, corpus_rows=True)
  rows, _ = pipeline.build_rows(parts["align"], tokenizer, pipeline.default_config())
  with pytest.raises(ValueError, match="were counted in the prior"):
    features.PriorFeature(view, rows.docs, corpus_rows=False)


def test_a_prior_is_refused_under_another_tokenizer_naming_both(setup, tmp_path):
  _, train, tokenizer, counts = setup
  store.save(tmp_path / "prior", counts, {"tokenizer": "/runs/a/tokenizer/hf",
                                          "tokenizer_fingerprint": fingerprint(tokenizer),
                                          "length_policy": "no_eos"})
  loaded, _ = store.load(tmp_path / "prior", tokenizer, "same", "no_eos")
  assert loaded.num_tokens == counts.num_tokens
  other = build_demo_tokenizer(tmp_path / "other", [r["response"] for r in train], vocab_size=300)
  with pytest.raises(ValueError, match=r"built with the tokenizer /runs/a/tokenizer/hf .*not with "
                                       r"/elsewhere/tok"):
    store.load(tmp_path / "prior", other, "/elsewhere/tok", "no_eos")
  with pytest.raises(ValueError, match="length_policy"):
    store.load(tmp_path / "prior", tokenizer, "same", "keep")
