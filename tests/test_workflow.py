"""The stage chain: finished steps are skipped, half-finished ones resumed, a step run with other
settings refused naming the keys unless rerun (then it and every later step run again, the old
outputs kept)."""
import json

import ml_collections
import pytest

from proxykd import runner, workflow


def _steps(calls, workdir, settings):
  def action(name):
    def go():
      calls.append(name)
      (workdir / name).mkdir(parents=True, exist_ok=True)
      (workdir / name / "out.txt").write_text(name)
    return go
  return [workflow.Step(name, ml_collections.ConfigDict(settings[name]), action(name))
          for name in ("a", "b", "c")]


def test_skip_refuse_rerun_and_resume(tmp_path, capsys, caplog):
  settings = {n: {"stage": "x", "lr": 0.1, "train": {"steps": 5, "progress_bar": True}} for n in "abc"}
  calls = []
  workflow.run(_steps(calls, tmp_path, settings), tmp_path)
  assert calls == ["a", "b", "c"] and (tmp_path / "c" / workflow.DONE).exists()
  assert "[2/3] b" in capsys.readouterr().out

  calls.clear()
  settings["b"]["train"]["progress_bar"] = False  # volatile: changes no result
  workflow.run(_steps(calls, tmp_path, settings), tmp_path)
  assert calls == [] and "[3/3] c: done already, skipped" in capsys.readouterr().out

  settings["b"]["train"]["steps"] = 7
  with pytest.raises(runner.UserError, match=r"b was made with other settings .*train\.steps.*"
                                             r"--config\.pipeline\.rerun=b"):
    workflow.run(_steps(calls, tmp_path, settings), tmp_path)
  assert calls == []
  with pytest.raises(runner.UserError, match="not a step of this pipeline"):
    workflow.run(_steps(calls, tmp_path, settings), tmp_path, rerun="z")

  workflow.run(_steps(calls, tmp_path, settings), tmp_path, rerun="b")
  assert calls == ["b", "c"]  # b and every later step; a skipped
  kept = sorted(p.name.split("-")[0] for p in (tmp_path / ".rerun").iterdir())
  assert kept == ["b", "c"]  # the old outputs are kept, not deleted
  assert json.loads((tmp_path / "b" / workflow.DONE).read_text())["config"]["train"]["steps"] == 7

  # A half-finished step (its config.json written, no done.json) runs again: the stage resumes.
  calls.clear()
  (tmp_path / "c" / workflow.DONE).unlink()
  (tmp_path / "c" / "config.json").write_text(json.dumps(settings["c"]))
  workflow.run(_steps(calls, tmp_path, settings), tmp_path)
  assert calls == ["c"]
  (tmp_path / "c" / workflow.DONE).unlink()
  (tmp_path / "c" / "config.json").write_text(json.dumps({**settings["c"], "lr": 0.2}))
  with pytest.raises(runner.UserError, match=r"half-finished run with other settings \(lr\)"):
    workflow.run(_steps(calls, tmp_path, settings), tmp_path)

  # A directory with nothing but its config.json (written before any work, e.g. by the chain's own
  # stage for its directory) is a fresh start, whatever that config says: not resumed, not refused.
  calls.clear()
  for name in "bc":
    for f in (tmp_path / name).iterdir():
      f.unlink()
  (tmp_path / "c" / "config.json").write_text(json.dumps({**settings["c"], "lr": 0.3}))
  caplog.clear()
  with caplog.at_level("INFO"):
    workflow.run(_steps(calls, tmp_path, settings), tmp_path)
  assert calls == ["b", "c"] and "[3/3] c" in caplog.text and "resuming" not in caplog.text
