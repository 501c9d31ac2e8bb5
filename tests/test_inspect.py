"""proxykd/analysis.py: one response token by token, checked against the formulas computed
directly on the record's unpacked tokenisation (prior, proxy, posterior, students, the teacher's
top-k), and its heat maps."""
import jax
import ml_collections
import numpy as np
import pytest

import sft_fixtures
from proxykd.data import pipeline, tokenize
from proxykd.estimator import store
from proxykd.estimator.build import counts_from_records
from proxykd.estimator.prior import PriorView
from proxykd import analysis
from proxykd.models.config import ModelConfig
from proxykd.models.tokenizer import fingerprint
from proxykd.models.transformer import Transformer, init_params

ESTIMATOR = {"kappa": 2.0, "m": 3.0, "tau": 1.5, "order": 3, "smoothing": "wb", "floor": 1e-6}
TEACHER_LP, OTHER_LP = -0.1, -2.5


def _model(seed: int, vocab: int) -> analysis.Model:
  cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=2, initializer_range=0.5)
  return init_params(cfg, jax.random.PRNGKey(seed)), cfg


def _with_teacher_logprobs(record: dict, tokenizer) -> dict:
  """The record as if the teacher had reported top-2 log-probabilities on our own tokens: its token
  at TEACHER_LP, and 'So' (one token of ours) at OTHER_LP."""
  enc = tokenizer(record["response"], add_special_tokens=False, return_offsets_mapping=True)
  pieces = [record["response"][a:b] for a, b in enc["offset_mapping"]]
  assert "".join(pieces) == record["response"]
  lps = [{"token": p, "logprob": TEACHER_LP,
          "top_logprobs": [{"token": p, "logprob": TEACHER_LP},
                           {"token": "So", "logprob": OTHER_LP}]}
         for p in pieces]
  return {**record, "logprobs": lps}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("inspect")
  records = sft_fixtures.synthetic_records(48, seed=3)
  tok = sft_fixtures.demo_tokenizer(root / "tokenizer", records)
  train, heldout = records[:40], records[40:]
  heldout[0] = _with_teacher_logprobs(heldout[0], tok)
  counts = counts_from_records(train, tok, max_order=3)
  store.save(root / "prior", counts, {"tokenizer": "test", "length_policy": "no_eos",
                                      "tokenizer_fingerprint": fingerprint(tok)})
  data = pipeline.default_config()
  data.update(seq_len=96, cache=False)
  config = ml_collections.ConfigDict({"data": data, "prior": "",
                                      "kd": {"prior_k": 8, "teacher_topk": 5}})
  view = analysis.RunView(root, config, tok, dict(ESTIMATOR), heldout)
  return view, train, _model(0, 512), _model(1, 512)


def _direct(run_view, record, model, tau=1.0):
  """(response token ids, log-softmax(logits / tau) at the response slots [n, V], the prior's
  histories [n, order - 1]) from a plain forward over the record's own unpacked tokenisation."""
  (ex,), _ = tokenize.tokenize([record], run_view.tokenizer)
  params, cfg = model
  z = np.asarray(Transformer(cfg).apply({"params": params}, ex.ids[None, :-1]))[0]
  slots = np.flatnonzero(ex.loss_mask[1:])
  logp = np.asarray(jax.nn.log_softmax(z[slots] / tau, axis=-1), np.float64)
  response = ex.ids[1:][slots]
  n = ESTIMATOR["order"] - 1
  bos = len(run_view.tokenizer)  # the counts' num_ids: BOS before the response's first token
  padded = np.concatenate([np.full(n, bos), response])
  hist = np.stack([padded[j:j + n] for j in range(len(response))])
  return response, logp, hist


def test_inspect_record_matches_the_formulas(run):
  view, _, proxy, student = run
  record = view.heldout[0]
  insp = analysis.inspect_record(view, record, proxy, {"student": student}, k=4)
  labels, log_q, hist = _direct(view, record, proxy, tau=ESTIMATOR["tau"])
  np.testing.assert_array_equal(insp.labels, labels)
  assert view.tokenizer.decode(labels, skip_special_tokens=True).startswith(record["response"])
  assert "".join(insp.tokens).startswith(record["response"][:12].replace(" ", "·"))

  # pi: the prior queried directly on the record's response histories, no leave-one-out.
  counts, _ = store.load(view.workdir / "prior", view.tokenizer, "test")
  pv = PriorView(counts, order=3, smoothing="wb", k=8, vocab_size=512, floor=1e-6)
  sparse = pv.query(hist, labels)
  pi = np.repeat(sparse.rest[:, None].astype(np.float64), 512, axis=1)
  np.put_along_axis(pi, sparse.ids, sparse.probs.astype(np.float64), axis=1)
  at = lambda p: np.log(np.take_along_axis(p, labels[:, None], axis=1)[:, 0])
  np.testing.assert_allclose(insp.label_logprob["prior"], at(pi), rtol=1e-5)
  q = np.exp(log_q)
  np.testing.assert_allclose(insp.label_logprob["proxy"], at(q), rtol=1e-4, atol=1e-6)

  # p_hat = (kappa pi + e + m q) / (kappa + 1 + m); without e: (kappa pi + m q) / (kappa + m).
  kappa, m = ESTIMATOR["kappa"], ESTIMATOR["m"]
  onehot = np.eye(512)[labels]
  target = (kappa * pi + onehot + m * q) / (kappa + 1 + m)
  ids, probs = insp.top["posterior"]
  np.testing.assert_allclose(probs, -np.sort(-target, axis=1)[:, :4], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.take_along_axis(target, ids, axis=1), probs, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(insp.label_logprob["posterior"], at(target), rtol=1e-4, atol=1e-6)
  estimate = (kappa * pi + m * q) / (kappa + m)
  np.testing.assert_allclose(insp.label_logprob["estimate"], at(estimate), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(insp.top["estimate"][1], -np.sort(-estimate, axis=1)[:, :4], rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(insp.top["prior"][1], -np.sort(-pi, axis=1)[:, :4], rtol=1e-5)

  # The student at the same positions; its NLL over the response is the mean of those.
  _, log_s, _ = _direct(view, record, student)
  np.testing.assert_allclose(insp.label_logprob["student"],
                             np.take_along_axis(log_s, labels[:, None], axis=1)[:, 0], rtol=1e-4,
                             atol=1e-5)
  assert insp.nll()["student"] == pytest.approx(-insp.label_logprob["student"].mean())

  # The teacher's reported top-k where it covers our tokens: the label first, 'So' second.
  t_ids, t_probs = insp.top["teacher"]
  covered = t_probs[:, 0] > 0
  assert covered.sum() >= len(labels) - 2  # all but the template's end-of-turn tokens
  np.testing.assert_array_equal(t_ids[covered, 0], labels[covered])
  np.testing.assert_allclose(t_probs[covered, 0], np.exp(TEACHER_LP), rtol=1e-6)
  so = view.tokenizer.convert_tokens_to_ids(view.tokenizer.tokenize("So"))[0]
  other = covered & (labels != so)
  assert (t_ids[other, 1] == so).all()
  np.testing.assert_allclose(insp.label_logprob["teacher"][covered], TEACHER_LP, rtol=1e-6)
  assert np.isnan(insp.label_logprob["teacher"][~covered]).all()
  assert "teacher" not in insp.nll()  # not every token has a reported probability


def test_a_record_the_prior_counted_is_refused(run):
  view, train, proxy, _ = run
  with pytest.raises(ValueError, match="were counted in the prior"):
    analysis.inspect_record(view, train[0], proxy, {})


def test_record_nll_on_packed_rows_equals_each_record_alone(run):
  view, _, proxy, student = run
  records = view.heldout[1:5]
  rows = analysis.rows_of(view, records)
  assert len(rows) < len(records)  # several records share a row
  ids, nll = analysis.record_nll({"student": student, "proxy": proxy}, rows)
  assert sorted(ids) == sorted(r["id"] for r in records)
  for rid, value in zip(ids, nll["student"]):
    record = next(r for r in records if r["id"] == rid)
    labels, log_s, _ = _direct(view, record, student)
    alone = -np.take_along_axis(log_s, labels[:, None], axis=1)[:, 0].mean()
    assert value == pytest.approx(alone, rel=1e-4)


def test_heat_maps_hold_the_top_tokens_and_the_teacher_token_probabilities(run, tmp_path):
  view, _, proxy, student = run
  insp = analysis.inspect_record(view, view.heldout[0], proxy, {"student": student}, k=4)
  fig = analysis.plot_top_tokens(insp, tmp_path / "top.png", k=3, start=2, count=10)
  shown = fig.axes[0].images[0].get_array()
  assert shown.shape == (10, 4 * 3)  # teacher, prior, proxy, posterior: 3 each
  np.testing.assert_allclose(shown[:, 9:12], insp.top["posterior"][1][2:12, :3])
  framed = [p for p in fig.axes[0].patches]  # the teacher's token where a top 3 holds it
  assert len(framed) >= 10  # the teacher's own column holds it on every covered row
  assert (tmp_path / "top.png").stat().st_size > 5000
  names = ["prior", "proxy", "estimate", "teacher", "student"]
  fig = analysis.plot_teacher_token(insp, names, tmp_path / "label.png", count=200)
  shown = fig.axes[0].images[0].get_array()
  assert shown.shape == (5, len(insp.labels))
  np.testing.assert_allclose(shown[4], np.exp(insp.label_logprob["student"]), rtol=1e-6)
  assert np.ma.getmaskarray(shown[3]).any() and not np.ma.getmaskarray(shown[:3]).any()
  labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
  assert labels[4] == f"student ({insp.nll()['student']:.3f} nats/token)" and labels[3] == "teacher"
  assert (tmp_path / "label.png").stat().st_size > 5000


def test_record_nll_scatter_marks_the_chosen_record(tmp_path):
  nll = {"before": np.array([1.0, 2.0, 3.0, 4.0]), "after": np.array([0.5, 2.5, 2.0, 3.0])}
  fig = analysis.plot_record_nll(nll, "before", "after", tmp_path / "records.png", marked=2)
  ax = fig.axes[0]
  np.testing.assert_allclose(ax.collections[0].get_offsets(),
                             np.stack([nll["before"], nll["after"]], axis=1))
  np.testing.assert_allclose(ax.collections[1].get_offsets(), [[3.0, 2.0]])
  assert ax.get_title() == "after lower on 75% of 4 responses"
  assert (tmp_path / "records.png").stat().st_size > 5000


def test_token_texts_show_whitespace(run):
  view, *_ = run
  tok = view.tokenizer
  ids = tok(" plus 3\n", add_special_tokens=False)["input_ids"]
  texts = analysis.token_texts(tok, ids + [len(tok) + 3])
  assert "".join(texts[i] for i in ids) == "·plus·3↵"
  assert texts[len(tok) + 3] == f"<{len(tok) + 3}>"
