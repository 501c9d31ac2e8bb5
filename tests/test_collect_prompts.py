"""Prompt loaders: files through `datasets` with a field mapping, and the named GSM8K/BBH sets."""
import json
from pathlib import Path

import pytest

from configs import collect as collect_config
from proxykd.data import prompts
from proxykd.errors import UserError
from proxykd.stages import collect

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k").exists(), reason="../shared/data is absent")


def cfg(**kw):
  c = collect_config.get_config().prompts
  c.update(**kw)
  return c


def test_malformed_line_fails_with_file_and_line(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"question": "a"}\n\n{"question": "b",\n{"question": "c"}\n')
  c = collect_config.get_config()
  c.prompts.update(source="file", path=str(path))
  with pytest.raises(UserError, match=r"p\.jsonl:3: not valid JSON"):
    collect.run(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd" / "collect" / "corpus.jsonl").exists()  # Refused before any request.


def test_missing_field_names_the_key_and_line(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text('{"question": "a"}\n{"q": "b"}\n')
  with pytest.raises(UserError, match=r"p\.jsonl:2: field 'question' \(prompts.prompt_field\)"):
    prompts.load_prompts(cfg(source="file", path=str(path)))
  with pytest.raises(UserError, match=r"p\.jsonl:1: field 'answer' \(prompts.meta_fields\)"):
    prompts.load_prompts(cfg(source="file", path=str(path), meta_fields="answer"))
  (tmp_path / "p.csv").write_text("question\na\n")
  with pytest.raises(UserError, match="unknown format"):
    prompts.load_prompts(cfg(source="file", path=str(tmp_path / "p.csv")))


def test_json_messages_field_and_parquet_mapping(tmp_path):
  import datasets  # pylint: disable=import-outside-toplevel
  chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
  (tmp_path / "p.json").write_text(json.dumps({"rows": [{"chat": chat, "gold": "4"}]}))
  got = prompts.load_prompts(cfg(source="file", path=str(tmp_path / "p.json"), json_field="rows",
                                 messages_field="chat", meta_fields="gold"))
  assert got == [{"messages": chat, "meta": {"source": str(tmp_path / "p.json"), "index": 0, "gold": "4"}}]
  datasets.Dataset.from_list([{"text": f"q{i}", "k": i} for i in range(5)]).to_parquet(str(tmp_path / "p.parquet"))
  got = prompts.load_prompts(cfg(source="file", path=str(tmp_path / "p.parquet"), prompt_field="text",
                                 meta_fields="k", offset=1, limit=2))
  assert [(p["messages"][0]["content"], p["meta"]["k"]) for p in got] == [("q1", 1), ("q2", 2)]


@needs_data
def test_named_gsm8k_and_bbh_loaders():
  test = prompts.load_prompts(cfg(source="gsm8k", split="test"))
  assert len(test) == 1319 and test[0]["meta"]["source"] == "gsm8k:test"
  assert test[0]["meta"]["answer"].lstrip("-").isdigit()
  bbh = prompts.load_prompts(cfg(source="bbh", tasks="boolean_expressions,navigate", cot=True))
  assert {p["meta"]["task"] for p in bbh} == {"boolean_expressions", "navigate"}
  first = bbh[0]["messages"][0]["content"]
  assert "canary" not in first.lower() and first.endswith("A: Let's think step by step.") and "Q: " in first
  with pytest.raises(UserError, match="not_a_task"):
    prompts.load_prompts(cfg(source="bbh", tasks="not_a_task"))


class _Stop(Exception):
  pass


def _stop_before_serving(*args, **kwargs):
  raise _Stop()


def test_local_synthetic_teacher_warns_about_prompts_it_cannot_answer(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(collect, "LocalTeacher", _stop_before_serving)  # Only the checks before serving run.
  path = tmp_path / "p.jsonl"
  path.write_text('{"question": "Translate \'good morning\' into French."}\n{"question": "Who wrote Hamlet?"}\n')
  c = collect_config.get_config()
  c.prompts.update(source="file", path=str(path))
  with pytest.raises(_Stop):
    collect.run(c, str(tmp_path / "a"))
  assert "2 of 2 prompts (prompts.source=file) are not the synthetic teacher's own" in caplog.text
  caplog.clear()
  c = collect_config.get_config()  # Its own problems: no warning.
  c.prompts.num = 50
  with pytest.raises(_Stop):
    collect.run(c, str(tmp_path / "b"))
  assert "synthetic teacher" not in caplog.text


@needs_data
def test_gsm8k_with_the_local_synthetic_teacher_warns(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(collect, "LocalTeacher", _stop_before_serving)
  c = collect_config.get_config("source=gsm8k")
  c.prompts.limit = 20
  with pytest.raises(_Stop):
    collect.run(c, str(tmp_path))
  assert "20 of 20 prompts (prompts.source=gsm8k) are not the synthetic teacher's own" in caplog.text
  assert "nonsense" in caplog.text
