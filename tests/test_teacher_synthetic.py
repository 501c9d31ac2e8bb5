"""The synthetic teacher: problem sets, answers, a real distribution with exact logprobs."""
import collections
import math
import random

import pytest

from proxykd.data import problems
from proxykd.teacher import backend, synthetic


def test_train_and_heldout_are_disjoint_and_deterministic():
  train = problems.generate(400, "train", seed=0)
  held = problems.generate(100, "heldout", seed=0)
  assert {p.question for p in train}.isdisjoint(p.question for p in held)
  assert [p.question for p in problems.generate(400, "train", seed=0)] == [p.question for p in train]
  assert [p.question for p in problems.generate(50, "train", seed=1)] != [p.question for p in train[:50]]
  assert {p.template for p in train} == {t.name for t in problems.TEMPLATES}
  with pytest.raises(ValueError, match="split"):
    problems.generate(1, "test")


def test_parse_recovers_every_answer():
  for p in problems.generate(300, "train", seed=3) + problems.generate(30, "heldout", seed=3):
    t, v = problems.parse("Please help.\n" + p.question)
    assert (t.name, v[t.answer]) == (p.template, p.answer)


def test_response_is_gsm8k_style_and_correct():
  for p in problems.generate(20, "heldout", seed=1):
    toks = synthetic.respond(p.question, rng=random.Random(0))
    text = "".join(t.text for t in toks)
    lines = text.split("\n")
    assert lines[-1] == f"#### {p.answer}" and len(lines) >= 4
    assert any("=" in line for line in lines)


def test_outputs_form_a_distribution_matching_reported_logprobs():
  q = problems.generate(1, "train", seed=5)[0].question
  rng = random.Random(0)
  samples = [synthetic.respond(q, rng=rng, top_logprobs=5) for _ in range(2000)]
  texts = collections.Counter("".join(t.text for t in s) for s in samples)
  assert len(texts) > 10  # Randomised phrasing: many distinct responses.
  # At temperature 1 a text's frequency is exp(sum of its token logprobs).
  text, count = texts.most_common(1)[0]
  seq = next(s for s in samples if "".join(t.text for t in s) == text)
  assert count / 2000 == pytest.approx(math.exp(sum(t.logprob for t in seq)), abs=0.03)
  for t in seq:  # top_logprobs: sorted, include the token itself, total mass <= 1
    assert t.top[0][1] >= t.top[-1][1] and sum(math.exp(l) for _, l in t.top) <= 1 + 1e-9
    assert dict(t.top)[t.text] == pytest.approx(t.logprob)


def test_temperature_zero_is_greedy_and_truncation():
  q = problems.generate(1, "train", seed=7)[0].question
  a = synthetic.respond(q, temperature=0.0, rng=random.Random(1))
  b = synthetic.respond(q, temperature=0.0, rng=random.Random(2))
  assert [t.text for t in a] == [t.text for t in b]
  assert "".join(t.text for t in a).startswith(synthetic.OPENERS[0])
  c = backend.truncate(a, 3, [])
  assert (len(c.tokens), c.finish_reason) == (3, "length")
  d = backend.truncate(a, None, ["####"])
  assert d.text == "".join(t.text for t in a).split("####")[0] and d.finish_reason == "stop"


def test_unknown_prompt_gets_a_naive_answer():
  text = "".join(t.text for t in synthetic.respond("What is 2 and 3?", rng=random.Random(0)))
  assert text.endswith("#### 5")
