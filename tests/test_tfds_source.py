"""Prompts from TensorFlow Datasets (`tfds:NAME/CONFIG:SPLIT`): a small dataset built locally, read
with tfds.data_source (no TensorFlow), by the collect stage and by eval's `prompts` task."""
import json
import subprocess
import sys

import numpy as np
import pytest

from configs import collect as collect_config
from conftest import REPO
from configs import eval as eval_config
from proxykd.data import prompts
from proxykd.eval import tasks
from proxykd.errors import UserError
from proxykd.stages import collect
from proxykd.data import problems

tfds = pytest.importorskip("tensorflow_datasets")

QUESTIONS = [p.question for p in problems.generate(6, "train", seed=5)]
ANSWERS = [p.answer for p in problems.generate(6, "train", seed=5)]


def _builder_class():
  class ProxykdWordProblems(tfds.core.GeneratorBasedBuilder):
    """Six of the synthetic teacher's problems: text, an integer answer and a list of tags."""
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="small")]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "question": tfds.features.Text(), "answer": tfds.features.Scalar(dtype=np.int64),
          "tags": tfds.features.Sequence(tfds.features.Text()), "idx": tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(range(4)), "test": self._generate_examples(range(4, 6))}

    def _generate_examples(self, indices):
      for i in indices:
        yield i, {"question": QUESTIONS[i], "answer": ANSWERS[i], "tags": ["arith", f"n{i}"], "idx": i}

  return ProxykdWordProblems


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  _builder_class()(data_dir=str(root), file_format="array_record").download_and_prepare()
  return root


def _cfg(**kw):
  c = collect_config.get_config().prompts
  c.update(**kw)
  return c


def test_tfds_rows_are_plain_python_and_mapped_like_a_file(data_dir):
  got = prompts.load_prompts(_cfg(source="tfds:proxykd_word_problems/small:train", data_dir=str(data_dir),
                                  prompt_field="question", meta_fields="answer,tags,idx"))
  assert len(got) == 4
  by_idx = {p["meta"]["idx"]: p for p in got}
  assert sorted(by_idx) == [0, 1, 2, 3]
  for i, p in by_idx.items():
    assert p["messages"] == [{"role": "user", "content": QUESTIONS[i]}]
    assert p["meta"]["answer"] == ANSWERS[i] and p["meta"]["tags"] == ["arith", f"n{i}"]
    assert p["meta"]["source"] == "tfds:proxykd_word_problems/small:train"
  # The split defaults to prompts.split; slices of TFDS' split syntax pass through.
  assert len(prompts.load_prompts(_cfg(source="tfds:proxykd_word_problems/small", split="test",
                                       data_dir=str(data_dir)))) == 2
  assert len(prompts.load_prompts(_cfg(source="tfds:proxykd_word_problems/small:train[:3]",
                                       data_dir=str(data_dir)))) == 3


def test_tfds_errors_are_one_line(data_dir):
  with pytest.raises(UserError, match=r"tfds:no_such_dataset.*DatasetNotFoundError") as e:
    prompts.load_prompts(_cfg(source="tfds:no_such_dataset:test", data_dir=str(data_dir)))
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match=r"proxykd_word_problems/small:validation"):
    prompts.load_prompts(_cfg(source="tfds:proxykd_word_problems/small:validation", data_dir=str(data_dir)))
  with pytest.raises(UserError, match=r"field 'prompt'"):
    prompts.load_prompts(_cfg(source="tfds:proxykd_word_problems/small:test", data_dir=str(data_dir),
                              prompt_field="prompt"))
  with pytest.raises(UserError, match="expected tfds:NAME"):
    prompts.load_prompts(_cfg(source="tfds:", data_dir=str(data_dir)))


def test_tfds_reading_needs_no_tensorflow(data_dir):
  code = (f"import sys; from proxykd.data import prompts; from configs import collect as c\n"
          f"p = c.get_config().prompts; p.source = 'tfds:proxykd_word_problems/small:test'\n"
          f"p.data_dir = {str(data_dir)!r}\n"
          f"print(len(prompts.load_prompts(p)), 'tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=REPO).stdout.split()
  assert out == ["2", "False"]


def test_collect_and_eval_accept_the_tfds_source(data_dir, tmp_path, monkeypatch):
  monkeypatch.delenv("OPENAI_API_KEY", raising=False)
  c = collect_config.get_config("runlocal")
  c.progress = False
  c.prompts.update(source="tfds:proxykd_word_problems/small:train", data_dir=str(data_dir),
                   meta_fields="answer")
  summary = collect.run(c, str(tmp_path))
  assert summary["collected"] == 4
  records = [json.loads(l) for l in (tmp_path / "collect" / "corpus.jsonl").read_text().splitlines()]
  for r in records:  # The local synthetic teacher answered its own problems, read from TFDS.
    assert r["meta"]["source"] == "tfds:proxykd_word_problems/small:train"
    assert r["response"].rstrip().endswith(f"#### {r['meta']['answer']}")
  e = eval_config.get_config().prompts
  e.update(source="tfds:proxykd_word_problems/small:test", data_dir=str(data_dir), meta_fields="answer")
  task = tasks.prompts_task(e, name="wp", answer_field="answer", answer_format="gsm8k")
  assert sorted(i.gold for i in task.items) == sorted(str(a) for a in ANSWERS[4:])
  assert task.items[0].correct(task.items[0].predict(f"so\n#### {task.items[0].gold}"))
