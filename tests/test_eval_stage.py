"""Stage `eval` end to end on a tiny model: every task, the files it writes, resume, and refusals."""
import json

import jax
import pytest

from configs import eval as eval_config
from conftest import SHARED_DATA
from proxykd.eval import generate, tasks
from proxykd.models import checkpoint, hf_io
from proxykd.models.config import preset
from proxykd.models.sampling import Sampler, bucket
from proxykd.models.tokenizer import end_of_turn_ids, load_tokenizer
from proxykd.models.transformer import init_params
from proxykd.errors import UserError
from proxykd.stages import eval as eval_stage
from sft_fixtures import synthetic_records, write_corpus

CFG = preset("tiny", vocab_size=384)
needs_data = pytest.mark.skipif(not (SHARED_DATA / "gsm8k").exists(), reason="../shared/data is absent")


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(7))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, params, demo_tokenizer_dir):
  """One of our checkpoints, recording its tokenizer."""
  root = tmp_path_factory.mktemp("model") / "checkpoints"
  checkpoint.save_checkpoint(root, 3, params, {"model": CFG.to_dict(), "tokenizer": str(demo_tokenizer_dir)})
  return root


def _config(model, **kw):
  c = eval_config.get_config("runlocal")
  c.model = str(model)
  c.progress = False
  c.update(kw)
  return c


def test_batched_generation_equals_one_at_a_time_and_stop_strings_cut_exactly(params, demo_tokenizer_dir):
  tokenizer = load_tokenizer(demo_tokenizer_dir)
  task = tasks.synthetic_task(num=6, seed=3, max_new_tokens=24)
  sampler = Sampler(CFG, min_batch=4)
  calls = []

  def gen(prompts, max_new, stop_ids):
    calls.append(len(prompts))
    # The longest prompts' bucket sets the batch; shorter ones only fill its padding rows.
    longest = bucket(max(map(len, prompts)), 16)
    same = sum(bucket(len(p), 16) == longest for p in prompts)
    assert len(prompts) == same or len(prompts) <= bucket(same, 1)
    return sampler.generate(params, prompts, max_new_tokens=max_new, eos_ids=end_of_turn_ids(tokenizer),
                            stop_ids=stop_ids)

  kw = dict(max_context=CFG.max_position_embeddings, end_ids=end_of_turn_ids(tokenizer), model_key="m")
  batched = generate.run_task(task, gen, tokenizer, batch_size=4, **kw)
  assert sum(calls) == 6 and max(calls) == 4
  assert generate.length_batches([3, 5, 17, 20, 20, 40], list("abcdef"), 2) == [
      ["f"], ["d", "e"], ["c"], ["b", "a"]]
  # Batches of 4: the three prompts of bucket 32 are padded to 4 rows anyway; the longest prompt of
  # bucket 16 fills the fourth. The lone prompt of bucket 64 is not padded (1 row), so it is alone.
  assert generate.length_batches([3, 5, 17, 20, 20, 40], list("abcdef"), 4) == [
      ["f"], ["d", "e", "c", "b"], ["a"]]
  assert generate.length_batches([3, 5, 40], list("abc"), 4, rows=lambda n: 4) == [["c", "b", "a"]]
  single = generate.run_task(task, gen, tokenizer, batch_size=1, **kw)
  assert [r["output"] for r in batched] == [r["output"] for r in single]
  assert [r["id"] for r in batched] == [i.id for i in task.items]  # item order, not length order
  # A stop string taken from an output: the text ends right before its first occurrence.
  text = batched[0]["output"]
  stop = text[5:8]
  cut = generate.run_task(tasks.Task(task.name, task.items[:1], 24, (stop,)), gen, tokenizer,
                          batch_size=4, **kw)[0]["output"]
  assert cut == text[:text.find(stop)]
  assert generate.cut_at_stop("abc\n\nQ: next", ["\n\nQ:", "zz"]) == ("abc", True)
  # Resume: items with matching keys are not generated again; a changed setting is.
  before = len(calls)
  again = generate.run_task(task, gen, tokenizer, batch_size=4, done={r["id"]: r for r in batched}, **kw)
  assert again == batched and len(calls) == before
  generate.run_task(task, gen, tokenizer, batch_size=4, done={r["id"]: r for r in batched},
                    **{**kw, "model_key": "other"})
  assert sum(calls[before:]) == 6


@needs_data
def test_eval_stage_every_task_files_and_resume(tmp_path, model_dir, monkeypatch):
  wd = tmp_path / "wd"
  corpus = write_corpus(wd / "collect" / "corpus.jsonl", synthetic_records(40))
  (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"q": f"What is {i} plus 1?", "a": str(i + 1)}) + "\n"
                                             for i in range(3)))
  (tmp_path / "mc").mkdir()
  (tmp_path / "mc" / "arcish.jsonl").write_text(
      json.dumps({"question": "Sky?", "choices": {"label": ["A", "B"], "text": ["blue", "green"]},
                  "answerKey": "A"}) + "\n" +
      json.dumps({"question": "Two?", "choices": ["1", "2", "3"], "answer": 1}) + "\n")
  c = _config(model_dir, tasks="gsm8k,bbh,synthetic,prompts,choice,heldout", limit=2)
  c.bbh.tasks = "boolean_expressions,date_understanding"
  c.prompts.update(name="qa", path=str(tmp_path / "qa.jsonl"), prompt_field="q", meta_fields="a",
                   answer_field="a", answer_format="number")
  c.choice.path = str(tmp_path / "mc")
  c.split.heldout = 0.3
  for block in (c.gsm8k, c.bbh, c.synthetic, c.prompts):
    block.max_new_tokens = 16  # few decode steps, and one new-token bucket for every task
  eval_stage.run(c, str(wd))
  out = wd / "eval"
  res = json.loads((out / "results.json").read_text())
  assert res["name"].endswith(model_dir.parent.name) and res["model"].endswith("checkpoints/3")
  assert set(res["tasks"]) == {"gsm8k", "bbh", "synthetic", "qa", "choice/arcish", "heldout"}
  assert res["tasks"]["gsm8k"]["total"] == 2 and res["tasks"]["bbh"]["total"] == 4
  assert set(res["tasks"]["bbh"]["groups"]) == {"boolean_expressions", "date_understanding"}
  assert res["tasks"]["choice/arcish"]["total"] == 2
  assert res["tasks"]["heldout"]["tokens"] > 0 and res["tasks"]["heldout"]["nll"] > 0
  for name, n in (("gsm8k", 2), ("bbh", 4), ("synthetic", 2), ("qa", 2), ("choice-arcish", 2)):
    lines = [json.loads(l) for l in (out / "predictions" / f"{name}.jsonl").read_text().splitlines()]
    assert len(lines) == n, name
  pred = json.loads((out / "predictions" / "gsm8k.jsonl").read_text().splitlines()[0])
  assert {"prompt", "output", "prediction", "gold", "correct"} <= set(pred)
  assert pred["gold"] == "18" and pred["prompt"].startswith("Janet")
  md = (out / "results.md").read_text()
  assert "| gsm8k | accuracy |" in md and "## bbh per task" in md
  # A rerun generates nothing: every prediction is reused.
  monkeypatch.setattr(Sampler, "generate", lambda *a, **k: pytest.fail("generated again"))
  eval_stage.run(c, str(wd))
  assert json.loads((out / "results.json").read_text())["tasks"]["gsm8k"] == {
      **res["tasks"]["gsm8k"], "seconds": pytest.approx(res["tasks"]["gsm8k"]["seconds"], abs=60)}
  # One task at a time: the other tasks' results of this model stay in results.json.
  c.tasks = "synthetic"
  eval_stage.run(c, str(wd))
  assert set(json.loads((out / "results.json").read_text())["tasks"]) == set(res["tasks"])
  assert corpus.exists()


def test_malformed_choice_file_names_file_and_line(tmp_path, model_dir):
  bad = tmp_path / "mc.jsonl"
  good = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})
  for body, match in (
      (f"{good}\n{{\"question\": \"q\",\n", r"mc\.jsonl:2: not valid JSON"),
      (f"{good}\n\n{json.dumps({'question': 'q', 'choices': ['a', 'b']})}\n", r"mc\.jsonl:3: `answer`"),
      (f"{json.dumps({'question': 'q', 'choices': ['a'], 'answer': 0})}\n", r"mc\.jsonl:1: `choices` needs"),
      (f"{json.dumps({'question': 'q', 'choices': ['a', 'b'], 'answer': 'C'})}\n", r"mc\.jsonl:1: `answer` 'C'"),
      ("[1, 2]\n", r"mc\.jsonl:1: expected a JSON object")):
    bad.write_text(body)
    with pytest.raises(UserError, match=match):
      eval_stage.run(_config(model_dir, tasks="choice", choice={"path": str(bad), "system_prompt": ""}),
                     str(tmp_path / "wd"))


def test_unsupported_or_missing_models_are_refused_by_name(tmp_path, params, demo_tokenizer_dir):
  hf = tmp_path / "hf"
  hf_io.export_hf(params, CFG, hf, tokenizer_dir=demo_tokenizer_dir)
  cfg = json.loads((hf / "config.json").read_text())
  (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  with pytest.raises(UserError, match=r"config.model=.*hf.*model_type 'gpt2' is not supported"):
    eval_stage.run(_config(hf, tasks="synthetic"), str(tmp_path / "wd"))
  with pytest.raises(UserError, match=r"config.model=.*nowhere: no such file"):
    eval_stage.run(_config(tmp_path / "nowhere", tasks="synthetic"), str(tmp_path / "wd"))
  with pytest.raises(UserError, match=r"set --config.model=PATH"):
    eval_stage.run(_config("", tasks="synthetic"), str(tmp_path / "wd"))
  with pytest.raises(UserError, match=r"config.tasks='gsm9k'"):
    eval_stage.run(_config(hf, tasks="gsm9k"), str(tmp_path / "wd"))
