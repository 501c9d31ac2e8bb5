"""The teacher's top-k log-probabilities on our tokens: alignment by character spans, mapping of
candidate strings to single tokens, coverage, and records whose logprobs do not spell the response."""
import random

import numpy as np

from proxykd.data import pipeline
from proxykd.estimator import teacher_topk
from proxykd.models.tokenizer import build_demo_tokenizer
from proxykd.data import problems
from proxykd.teacher import synthetic


def _record(i, question, rng):
  tokens = synthetic.respond(question, temperature=1.0, rng=rng, top_logprobs=3)
  return {"id": f"rec{i}", "messages": [{"role": "user", "content": question}],
          "response": "".join(t.text for t in tokens), "finish_reason": "stop",
          "logprobs": [{"token": t.text, "logprob": t.logprob,
                        "top_logprobs": [{"token": s, "logprob": lp} for s, lp in t.top]}
                       for t in tokens]}


def test_teacher_candidates_land_on_the_tokens_they_span(tmp_path):
  rng = random.Random(0)
  records = [_record(i, p.question, rng) for i, p in enumerate(problems.generate(12, seed=5))]
  tokenizer = build_demo_tokenizer(tmp_path, [r["response"] for r in records] +
                                   [r["messages"][0]["content"] for r in records], vocab_size=400)
  broken = dict(records[-1], id="broken", response=records[-1]["response"] + " extra")
  transform = teacher_topk.TeacherFeatures(records + [broken], tokenizer, k=3)
  data = pipeline.default_config()
  data.seq_len = 512
  rows, _ = pipeline.build_rows(records + [broken], tokenizer, data, shuffle=False,
                                transform=transform, transform_key=transform.key)
  vocab = teacher_topk.vocabulary_map(tokenizer)
  strings = teacher_topk.token_strings(tokenizer)
  assert strings[vocab[" step"]] == " step"
  cov = transform.coverage
  assert cov.records == 13 and cov.records_misaligned == 1
  assert 0.3 < cov.covered / cov.response_tokens < 1.0  # " apples." is two tokens of ours: uncovered
  a = rows.arrays
  by_id = {r["id"]: r for r in records}
  seen = 0
  for r, t in zip(*np.nonzero(a["loss_mask"])):
    ids, lps = a["teacher_ids"][r, t], a["teacher_logp"][r, t]
    rid = rows.docs[a["doc"][r, t]]
    if rid == "broken":
      assert (ids == -1).all()
      continue
    if ids[0] < 0:
      continue
    seen += 1
    target = int(a["targets"][r, t])
    # The teacher's token here is our target token, and the candidates are, as texts of single
    # tokens of ours, the mapped top-k of one teacher position with that token (best first).
    valid = ids >= 0
    assert target in ids[valid].tolist()
    got = [(strings[i], np.float32(lp)) for i, lp in zip(ids[valid], lps[valid])]
    options = [[(c["token"], np.float32(c["logprob"])) for c in tok["top_logprobs"] if c["token"] in vocab]
               for tok in by_id[rid]["logprobs"] if tok["token"] == strings[target]]
    assert got in options
    assert np.all(np.diff(lps[valid]) <= 0)
  assert seen == cov.with_candidates > 100
