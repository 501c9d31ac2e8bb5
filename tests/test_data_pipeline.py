"""Split, tokenisation with the chat template, truncation, packing and the batch iterator."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sft_fixtures
from proxykd import losses, runner
from proxykd.data import batches, packing, pipeline, split, tokenize
from proxykd.models.config import preset
from proxykd.models.transformer import Transformer, init_params, lm_head_kernel
from proxykd.stages import inputs


@pytest.fixture(scope="module")
def records():
  return sft_fixtures.synthetic_records(60)


@pytest.fixture(scope="module")
def tokenizer(records, tmp_path_factory):
  return sft_fixtures.demo_tokenizer(tmp_path_factory.mktemp("tok"), records)


def _prompt(i: int, sample_index: int = 0) -> dict:
  msgs = [{"role": "user", "content": f"question {i}"}]
  return {"id": f"r{i}-{sample_index}", "messages": msgs, "sample_index": sample_index}


def test_split_is_deterministic_by_prompt_with_configured_fractions():
  cfg = split.default_config()
  recs = [_prompt(i) for i in range(20000)]
  parts = split.split_records(recs, cfg)
  sizes = {k: len(v) / len(recs) for k, v in parts.items()}
  assert abs(sizes["heldout"] - 0.01) < 0.004
  for name, frac in (("warmup", 0.1), ("align", 0.45), ("distill", 0.45)):
    assert abs(sizes[name] - frac * 0.99) < 0.015, sizes
  # Order and corpus growth do not move a record; the corpus's order does not change the lists.
  again = split.split_records(list(reversed(recs[:5000])), cfg)
  for name, members in again.items():
    assert {r["id"] for r in members} <= {r["id"] for r in parts[name]}
  assert again == split.split_records(recs[:5000], cfg)
  cfg.update(warmup=0.5, align=0.25, distill=0.25, heldout=0.0)
  assert abs(len(split.split_records(recs, cfg)["warmup"]) / len(recs) - 0.5) < 0.02
  cfg.warmup = 0.6
  with pytest.raises(ValueError, match="must sum to 1"):
    split.split_records(recs, cfg)


def test_every_sample_of_a_prompt_lands_in_the_same_split():
  cfg = split.default_config()
  cfg.heldout = 0.2  # Enough held-out prompts to see a leak if there were one.
  recs = [_prompt(i, s) for i in range(500) for s in range(4)]  # teacher.n = 4
  parts = split.split_records(recs, cfg)
  where = {}
  for name, members in parts.items():
    for r in members:
      where.setdefault(r["messages"][0]["content"], set()).add(name)
  assert len(where) == 500 and all(len(v) == 1 for v in where.values())
  assert len(parts["heldout"]) % 4 == 0 and len(parts["heldout"]) > 0


def test_prompt_is_masked_and_response_trained(records, tokenizer):
  ex, stats = tokenize.tokenize(records[:3], tokenizer)
  assert stats.total == 3 and stats.boundary_merged == 0
  for rec, e in zip(records, ex):
    prompt = tokenizer.apply_chat_template(rec["messages"], add_generation_prompt=True,
                                           tokenize=False)
    n_prompt = int(np.argmax(e.loss_mask))
    assert not e.loss_mask[:n_prompt].any() and e.loss_mask[n_prompt:].all()
    assert tokenizer.decode(e.ids[:n_prompt]) == prompt
    assert tokenizer.decode(e.ids[n_prompt:]) == rec["response"] + "<|eot_id|>"


def test_truncation_policies_and_counts(records, tokenizer):
  ex, _ = tokenize.tokenize(records, tokenizer)
  lengths = np.array([len(e.ids) for e in ex])
  limit = int(np.median(lengths))
  too_long = int((lengths > limit).sum())
  kept, stats = tokenize.truncate(ex, limit, "drop")
  assert stats.dropped == too_long and stats.truncated == 0 and len(kept) == len(ex) - too_long
  kept, stats = tokenize.truncate(ex, limit, "truncate_response")
  assert stats.truncated + stats.dropped == too_long and stats.total == len(ex)
  assert all(len(e.ids) <= limit for e in kept)
  long_ex = next(e for e in ex if len(e.ids) > limit)
  cut = next(k for k in kept if k.id == long_ex.id)
  np.testing.assert_array_equal(cut.ids, long_ex.ids[:limit])  # The end was cut.
  kept, stats = tokenize.truncate(ex, limit, "truncate_prompt")
  cut = next(k for k in kept if k.id == long_ex.id)
  np.testing.assert_array_equal(cut.ids, long_ex.ids[-limit:])  # The prompt's start was cut.
  assert cut.loss_mask.sum() == long_ex.loss_mask.sum()
  assert cut.start == len(long_ex.ids) - limit  # Token offsets still refer to the whole record.
  with pytest.raises(ValueError, match="config.data.truncation"):
    tokenize.truncate(ex, limit, "middle")


def test_packing_leaks_no_attention_and_prompt_tokens_get_no_loss(records, tokenizer):
  cfg = preset("tiny")
  ex, _ = tokenize.tokenize(records[:12], tokenizer)
  packed_rows = packing.pack(ex, 200)
  rows = packed_rows.arrays
  assert rows["segment_ids"].max() >= 3  # Several documents per row.
  params = init_params(cfg, jax.random.PRNGKey(0))
  model = Transformer(cfg)
  packed = model.apply({"params": params}, rows["inputs"], rows["positions"], rows["segment_ids"])
  at = {}
  for r in range(len(rows["inputs"])):
    for seg in range(1, rows["segment_ids"][r].max() + 1):
      at[len(at)] = (r, np.flatnonzero(rows["segment_ids"][r] == seg))
  # Each document alone (one per row, padded with segment 0) gives the same logits as packed.
  longest = max(len(e.ids) for e in ex) - 1
  alone_rows = {k: np.zeros((len(ex), longest), np.int32) for k in ("inputs", "positions", "seg")}
  for d, e in enumerate(ex):
    n = len(e.ids) - 1
    alone_rows["inputs"][d, :n] = e.ids[:-1]
    alone_rows["positions"][d, :n] = np.arange(n)
    alone_rows["seg"][d, :n] = 1
  alone = model.apply({"params": params}, alone_rows["inputs"], alone_rows["positions"],
                      alone_rows["seg"])
  for d, e in enumerate(ex):
    r, cols = at[d]
    np.testing.assert_allclose(packed[r, cols], alone[d, :len(cols)], atol=2e-5)
    np.testing.assert_array_equal(rows["targets"][r, cols], e.ids[1:])
    np.testing.assert_array_equal(rows["loss_mask"][r, cols], e.loss_mask[1:])
    # Row identity: every slot names its record and the target's offset in that record.
    assert {packed_rows.docs[i] for i in rows["doc"][r, cols]} == {e.id}
    np.testing.assert_array_equal(rows["offset"][r, cols], np.arange(1, len(e.ids)))
  assert not rows["loss_mask"][rows["segment_ids"] == 0].any()  # Padding has no loss.
  assert (rows["doc"][rows["segment_ids"] == 0] == -1).all()

  hidden = model.apply({"params": params}, rows["inputs"], rows["positions"], rows["segment_ids"],
                       return_hidden=True)
  kernel = lm_head_kernel(params, cfg)
  nll = lambda t: losses.nll(hidden, kernel, jnp.asarray(t), rows["loss_mask"], 32)
  base = nll(rows["targets"])
  prompt_changed = np.where(rows["loss_mask"] == 0, (rows["targets"] + 1) % 512, rows["targets"])
  assert float(nll(prompt_changed)) == float(base)
  response_changed = np.where(rows["loss_mask"] == 1, (rows["targets"] + 1) % 512, rows["targets"])
  assert float(nll(response_changed)) != float(base)


def test_batches_are_deterministic_and_resumable(records, tokenizer):
  data = pipeline.default_config()
  data.update(seq_len=64, seed=3)
  rows = pipeline.build_rows(records, tokenizer, data)[0].arrays
  n = len(rows["inputs"])
  it = batches.BatchIterator(rows, 4, seed=3)
  first = [it.next_local()["inputs"] for _ in range(2 * n // 4 + 1)]  # Over two epochs.
  seen = np.concatenate(first)[:n]
  assert sorted(map(bytes, seen)) == sorted(map(bytes, rows["inputs"]))  # An epoch = all rows.
  state = it.state()
  expected_next = it.next_local()["inputs"]
  again = batches.BatchIterator(rows, 4, seed=3)
  again.restore(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(again.next_local()["inputs"], expected_next)
  other = batches.BatchIterator(rows, 4, seed=4)
  assert not np.array_equal(other.next_local()["inputs"], first[0])
  with pytest.raises(ValueError, match="seed 3, but the data now has .* seed 4"):
    other.restore(state)


def test_rows_are_cached_by_content_tokenizer_and_settings(records, tokenizer, tmp_path, monkeypatch):
  data = pipeline.default_config()
  data.update(seq_len=64)
  rows, stats = pipeline.build_rows(records, tokenizer, data, cache_dir=tmp_path, name="train")
  assert len(list(tmp_path.glob("train-*.npz"))) == 1

  def no_tokenising(*args, **kwargs):
    raise AssertionError("tokenised again although the rows are cached")

  monkeypatch.setattr(tokenize, "tokenize", no_tokenising)
  again, stats_again = pipeline.build_rows(records, tokenizer, data, cache_dir=tmp_path, name="train")
  assert again.docs == rows.docs and stats_again == stats
  for k, v in rows.arrays.items():
    np.testing.assert_array_equal(again.arrays[k], v)
    assert again.arrays[k].dtype == v.dtype
  for change in ({"seq_len": 48}, {"truncation": "drop"}, {"seed": 5}):  # Another key: recomputed.
    with pytest.raises(AssertionError, match="tokenised again"):
      pipeline.build_rows(records, tokenizer, ml_collections.ConfigDict({**data.to_dict(), **change}),
                          cache_dir=tmp_path, name="train")
  edited = [dict(records[0], response="changed")] + records[1:]
  with pytest.raises(AssertionError, match="tokenised again"):
    pipeline.build_rows(edited, tokenizer, data, cache_dir=tmp_path, name="train")


def test_position_artefacts_are_refused_under_other_rows(tokenizer, demo_tokenizer_dir):
  from proxykd.models.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  data = pipeline.default_config()
  made = pipeline.fingerprint_of_rows(tokenizer, data)
  pipeline.check_fingerprint(made, pipeline.fingerprint_of_rows(tokenizer, data), "the cache")
  other = load_tokenizer(demo_tokenizer_dir)
  with pytest.raises(ValueError, match=r"the cache was made under other token rows \(tokenizer: "):
    pipeline.check_fingerprint(made, pipeline.fingerprint_of_rows(other, data), "the cache")
  data.truncation = "truncate_prompt"
  with pytest.raises(ValueError, match="truncation: made with 'truncate_response', now 'truncate_prompt'"):
    pipeline.check_fingerprint(made, pipeline.fingerprint_of_rows(tokenizer, data), "the cache")


def test_malformed_corpus_line_names_file_and_line(records, tmp_path):
  path = sft_fixtures.write_corpus(tmp_path / "corpus.jsonl", records[:5])
  lines = path.read_text().splitlines()
  lines[2] = lines[2][:-1]  # Line 3 is cut short: not valid JSON.
  path.write_text("\n".join(lines) + "\n")
  config = ml_collections.ConfigDict(dict(corpus=str(path), split=split.default_config(),
                                          split_name="all"))
  with pytest.raises(runner.UserError, match=rf"{path}:3: not valid JSON"):
    inputs.load_split(config, tmp_path)
  lines[2] = json.dumps({**records[2], "response": 7})
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(runner.UserError, match=rf"{path}:3: `response` must be a string"):
    inputs.load_split(config, tmp_path)
