"""Answer extraction and prompts on the real data: GSM8K test lines, BBH targets and cot-prompts."""
import json

import pytest

from conftest import SHARED_DATA
from proxykd.data import prompts
from proxykd.eval import answers, tasks

needs_data = pytest.mark.skipif(not (SHARED_DATA / "gsm8k").exists(), reason="../shared/data is absent")

# The format each BBH task's targets imply, as the BBH paper scores them.
BBH_FORMATS = {
    "boolean_expressions": "binary", "causal_judgement": "binary", "formal_fallacies": "binary",
    "navigate": "binary", "sports_understanding": "binary", "web_of_lies": "binary",
    "multistep_arithmetic_two": "number", "object_counting": "number",
    "dyck_languages": "text", "word_sorting": "text",
}


def _gsm8k_lines(split="test"):
  with open(SHARED_DATA / "gsm8k" / f"{split}.jsonl") as f:
    return [json.loads(l) for l in f]


@needs_data
def test_gsm8k_gold_solutions_parse_to_their_own_answers():
  rows = _gsm8k_lines()
  assert len(rows) == 1319
  for row in rows:
    gold = prompts.gsm8k_answer(row["answer"])
    assert answers.gsm8k_prediction(row["answer"]) == gold, row["answer"]
    assert answers.gsm8k_correct(answers.gsm8k_prediction(row["answer"]), gold)
    # Without the '####' line the last number of the reasoning is taken.
    body = row["answer"].rsplit("####", 1)[0]
    assert answers.gsm8k_prediction(body) == (answers.numbers(body) or [None])[-1]
  # The gold answers with thousands separators (e.g. "1,000") are among them and compare equal.
  commas = [r for r in rows if "," in r["answer"].rsplit("####", 1)[1]]
  assert commas and all(answers.gsm8k_correct(r["answer"].rsplit("####", 1)[1].strip(),
                                                prompts.gsm8k_answer(r["answer"])) for r in commas)


def test_gsm8k_tricky_outputs():
  p = answers.gsm8k_prediction
  assert p("She earns $1,234.50 in total.\n#### $1,234.50") == "1234.5"
  assert p("The answer is 18.") == "18"  # trailing period
  assert p("First 3 + 4 = 7, then 7 * 2 = 14 apples.") == "14"  # several numbers: the last
  assert p("#### 42\nThen #### 7") == "42"  # the first final answer
  assert p("#### 18.00") == "18" and p("####-5") == "-5"
  assert p("#### twelve, or 12 in digits") == "12"  # the first number after ####
  assert p("no digits at all") is None
  assert answers.gsm8k_correct("1000", "1,000") and not answers.gsm8k_correct(None, "3")
  assert answers.gsm8k_correct(p("It costs 3.0 dollars"), "3")
  assert answers.normalize_number("abc") is None and answers.normalize_number("$ 2,000") == "2000"


@needs_data
def test_bbh_formats_and_extraction_on_every_real_target():
  task_dir = SHARED_DATA / "bbh" / "tasks"
  names = sorted(p.stem for p in task_dir.glob("*.json"))
  assert len(names) == 27
  for name in names:
    targets = [e["target"] for e in json.loads((task_dir / f"{name}.json").read_text())["examples"]]
    fmt, labels = answers.infer_format(targets)
    assert fmt == BBH_FORMATS.get(name, "choice"), name
    if fmt == "binary":
      assert len(labels) == 2 and set(labels) == set(targets)
    for t in targets:
      # The exemplars' own ending, as the model is shown it, reads back as the target ...
      out = f"Let's think step by step.\nSome reasoning (B) 12 True.\nSo the answer is {t}."
      assert answers.bbh_prediction(out, fmt, labels) == t.strip(), (name, t)
      assert answers.bbh_correct(answers.bbh_prediction(out, fmt, labels), t, fmt)
    if fmt == "binary":  # ... whatever its case, written back as the task writes it.
      t = targets[0]
      assert answers.bbh_prediction(f"So the answer is {t.upper()}.", fmt, labels) == t
      other = next(l for l in labels if l != t)
      assert not answers.bbh_correct(answers.bbh_prediction(f"So the answer is {other}.", fmt, labels), t, fmt)


def test_bbh_extraction_without_the_phrase_takes_the_last_match():
  assert answers.bbh_prediction("(A) looks wrong; (C) is it.", "choice") == "(C)"
  assert answers.bbh_prediction("So the answer is C.", "choice") == "(C)"
  labels = ("invalid", "valid")
  assert answers.bbh_prediction("It is valid? No: the argument is invalid", "binary", labels) == "invalid"
  assert answers.bbh_prediction("So the answer is Valid.", "binary", labels) == "valid"
  assert answers.bbh_prediction("2 + 3 = 5, minus 9 is -4", "number") == "-4"
  assert answers.bbh_prediction("So the answer is 1,024.", "number") == "1024"
  assert answers.bbh_prediction("sorted:\nalpha beta gamma\n", "text") == "alpha beta gamma"
  assert answers.bbh_prediction("nothing here", "choice") is None
  assert answers.bbh_correct("] ]", " ]  ] ", "text")


@needs_data
def test_bbh_three_shot_prompts_are_built_exactly_from_cot_prompts():
  task = tasks.bbh_task(SHARED_DATA, tasks="date_understanding,word_sorting", shots=3, limit=2)
  assert [i.group for i in task.items] == ["date_understanding"] * 2 + ["word_sorting"] * 2
  for item in task.items:
    raw = (SHARED_DATA / "bbh" / "cot-prompts" / f"{item.group}.txt").read_text()
    header, sep, exemplars = raw.partition("-----")
    assert sep and "canary" in header.lower()
    example = json.loads((SHARED_DATA / "bbh" / "tasks" / f"{item.group}.json").read_text())["examples"][
        int(item.id.rsplit(":", 1)[1])]
    assert item.messages == [{"role": "user", "content":
                              f"{exemplars.strip()}\n\nQ: {example['input']}\nA: Let's think step by step."}]
    assert item.gold == example["target"]
    assert exemplars.strip().count("So the answer is") == 3
  zero = tasks.bbh_task(SHARED_DATA, tasks="word_sorting", shots=0, limit=1).items[0]
  assert zero.messages[0]["content"].startswith("Q: Sort the following words")
  assert zero.messages[0]["content"].endswith("\nA: Let's think step by step.")
  assert zero.answer_format == "text"


@needs_data
def test_gsm8k_k_shot_turns_come_from_the_train_file():
  task = tasks.gsm8k_task(SHARED_DATA, shots=2, system_prompt="Solve it.", limit=3)
  train = _gsm8k_lines("train")
  item = task.items[1]
  assert item.id == "gsm8k:test:1" and item.gold == prompts.gsm8k_answer(_gsm8k_lines()[1]["answer"])
  roles = [m["role"] for m in item.messages]
  assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
  assert item.messages[1]["content"] == train[0]["question"]
  assert "<<" not in item.messages[2]["content"] and item.messages[2]["content"].endswith(
      "#### " + train[0]["answer"].rsplit("#### ", 1)[1])
  assert tasks.strip_calculator("2 * 3 = <<2*3=6>>6") == "2 * 3 = 6"
