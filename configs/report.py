"""Stage `report`: runs side by side, one table, PNG plots and a report.md that embeds them.

  python main.py --config=configs/report.py --config.runs=runs/sft,runs/proxykd,runs/posterior \
      --workdir=runs/report

A run is a workdir, or one training stage's directory in it that the eval stage wrote to
(--config.output=DIR/student_sft/eval: several students of one workdir side by side). Reads from
each run directory whatever it has (eval/results.json, proxy_dpo/rounds.jsonl,
calibrate/table.json, every tensorboard/ directory) and writes to --config.output (default
<workdir>/report/): report.md, table.md, runs.json and the PNGs (training_curves, dpo_rounds,
calibration, bbh_tasks, fidelity; a figure without data is left out).
"""
import ml_collections

from configs import common


def get_config(arg=None):
  common.parse_arg(arg)  # No variants.
  c = ml_collections.ConfigDict()
  c.stage = "report"
  # Comma-separated run directories (each made absolute against the directory you run in).
  c.runs = ""
  c.names = ""  # Comma-separated labels, one per run; default: the eval results' name, else the directory's.
  c.output = ""  # Default <workdir>/report.
  return c
