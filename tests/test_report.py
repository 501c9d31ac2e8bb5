"""Stage `report`: the table lists every run, the PNGs are written and non-empty, TensorBoard
scalars are read back as written (a resumed run's rewritten steps: the last value wins)."""
import json

import pytest

from configs import report as report_config
from proxykd.eval import report, tensorboard
from proxykd.errors import UserError
from proxykd.stages import report as report_stage

PNG = b"\x89PNG\r\n\x1a\n"


def _eval(run, name, gsm8k, bbh, fidelity=None):
  tasks = {"gsm8k": {"accuracy": gsm8k, "total": 10},
           "bbh": {"accuracy": sum(bbh.values()) / 2, "average": sum(bbh.values()) / len(bbh),
                   "groups": {k: {"accuracy": v, "total": 4} for k, v in bbh.items()}, "total": 8},
           "heldout": {"nll": 1.5, "top1": 0.6, "tokens": 100, "records": 3},
           "choice/arc": {"accuracy": 0.5, "accuracy_per_token": 0.75, "accuracy_per_byte": 0.25, "total": 4}}
  if fidelity:
    tasks["fidelity"] = {"estimates": {k: {"kl": v, "top1": 0.5} for k, v in fidelity.items()}, "tokens": 50}
  (run / "eval").mkdir(parents=True)
  (run / "eval" / "results.json").write_text(json.dumps({"name": name, "model": "m", "tasks": tasks}))


def _tensorboard(logdir, points, purge_step=None, suffix=""):
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  w = SummaryWriter(str(logdir), purge_step=purge_step, filename_suffix=suffix)
  for step, loss in points:
    w.add_scalar("train/loss", loss, step)
    if step % 2 == 0:
      w.add_scalar("eval/loss", loss + 0.5, step)
  w.close()


@pytest.fixture()
def runs(tmp_path):
  a, b = tmp_path / "sft", tmp_path / "proxykd"
  _eval(a, "sft-baseline", 0.1, {"boolean_expressions": 0.5, "navigate": 0.25})
  _eval(b, "proxy-kd", 0.2, {"boolean_expressions": 0.75, "navigate": 0.5},
        fidelity={"prior": 2.0, "proxy": 1.0, "posterior": 0.5, "student": 0.8})
  _tensorboard(a / "proxy_sft" / "tensorboard", [(s, 5.0 - s / 10) for s in range(1, 11)])
  for k in (1, 2):
    _tensorboard(b / "proxy_dpo" / "rounds" / f"00{k}" / "tensorboard", [(s, 3.0 / k + s) for s in (1, 2, 3)])
  (b / "proxy_dpo" / "rounds.jsonl").write_text("".join(json.dumps(
      {"round": k, "heldout_top1": 0.3 + 0.1 * k, "heldout_nll": 3.0 - k}) + "\n" for k in (0, 1, 2)))
  settings = [{"order": 3, "smoothing": "wb", "tau": 1.0, "kappa": 4.0, "m": m, "family": "posterior",
               "nats_per_token": 2.0 - 0.1 * i} for i, m in enumerate((0.5, 1.0, 2.0, 4.0))]
  (b / "calibrate").mkdir()
  (b / "calibrate" / "table.json").write_text(json.dumps({
      "settings": settings, "chosen": {**settings[-1]},
      "best": {"prior only": {"nats_per_token": 2.5}, "proxy only": {"nats_per_token": 2.1},
               "posterior": settings[-1]}}))
  return a, b


def test_report_table_lists_every_run_and_writes_the_plots(runs, tmp_path):
  a, b = runs
  c = report_config.get_config()
  c.runs = f"{a},{b},{a}"
  out = report_stage.run(c, str(tmp_path / "wd"))
  md = (out / "report.md").read_text()
  table = (out / "table.md").read_text()
  rows = [l for l in table.splitlines()[2:] if l.startswith("|")]
  assert [l.split("|")[1].strip() for l in rows] == ["sft-baseline", "proxy-kd", "sft-baseline (2)"]
  header = table.splitlines()[0]
  for col in ("GSM8K", "BBH avg", "arc (MC)", "held-out NLL", "calibrated nats/token", "KL(T‖posterior)",
              "KL(T‖student)"):
    assert col in header
  assert "| sft-baseline | 0.1000 | 0.3750 |" in table and "| proxy-kd | 0.2000 | 0.6250 |" in table
  assert "–" in rows[0]  # a run without fidelity or calibration
  for key in ("training_curves", "dpo_rounds", "calibration", "bbh_tasks", "fidelity"):
    data = (out / f"{key}.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 5000, key
    assert f"![{key}]({key}.png)" in md
  assert "| proxy-kd | posterior | 0.5000 | 0.5000 |" in md
  # A run with nothing but eval results: no figure that needs more is drawn.
  c.runs, c.output = str(a), str(tmp_path / "only_a")
  out = report_stage.run(c, str(tmp_path / "wd"))
  assert sorted(p.name for p in out.glob("*.png")) == ["bbh_tasks.png", "training_curves.png"]


def test_tensorboard_scalars_and_dpo_rounds_joined(runs, tmp_path):
  a, b = runs
  logdir = tmp_path / "tb"
  _tensorboard(logdir, [(1, 9.0), (2, 8.0), (3, 7.0)], suffix=".1")
  # Resumed from step 2 (a newer file: its name sorts later, as the creation time would make it).
  _tensorboard(logdir, [(3, 1.0), (4, 0.5)], purge_step=3, suffix=".2")
  curves = tensorboard.read_scalars(logdir)
  assert curves["train/loss"] == [(1, 9.0), (2, 8.0), (3, 1.0), (4, 0.5)]
  assert curves["eval/loss"] == [(2, 8.5), (4, 1.0)]
  run = report.read_run(b)
  assert run.name == "proxy-kd" and [r["round"] for r in run.dpo_rounds] == [0, 1, 2]
  assert run.curves["proxy_dpo"]["train/loss"] == [(1, 4.0), (2, 5.0), (3, 6.0), (4, 2.5), (5, 3.5), (6, 4.5)]
  assert report.read_run(a, "named").name == "named"
  # A run that is one training stage's directory: its own curves are named by it, and a workdir
  # holding it leaves them to it when both are runs of the report.
  _tensorboard(b / "student_sft" / "tensorboard", [(1, 2.0), (2, 1.0)])
  assert report.read_run(b / "student_sft").curves["student_sft"]["train/loss"] == [(1, 2.0), (2, 1.0)]
  assert "student_sft" in report.read_run(b).curves
  assert "student_sft" not in report.read_run(b, others=[str(b / "student_sft")]).curves


def test_report_refuses_missing_runs(tmp_path):
  c = report_config.get_config()
  with pytest.raises(UserError, match="set --config.runs"):
    report_stage.run(c, str(tmp_path))
  c.runs = str(tmp_path / "nope")
  with pytest.raises(UserError, match="nope is not a directory"):
    report_stage.run(c, str(tmp_path))
  c.runs, c.names = f"{tmp_path},{tmp_path}", "one"
  with pytest.raises(UserError, match="1 labels for 2 runs"):
    report_stage.run(c, str(tmp_path))
