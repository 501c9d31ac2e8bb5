"""Runs side by side: what each run directory holds, one comparison table, and `report.md`.

A run is a workdir of the pipeline. Read from it, when present:
- `eval/results.json` (the eval stage): GSM8K, BBH average and per task, the synthetic problems,
  other prompt tasks, multiple choice, held-out teacher NLL and top-1, estimator fidelity;
- `proxy_dpo/rounds.jsonl`: the held-out agreement and NLL of the proxy per DPO round;
- `calibrate/table.json`: the calibration grid (nats/token per setting) and the chosen setting;
- every `tensorboard/` directory: the training curves of each stage.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

from etils import epath

from proxykd.eval import results as eval_results
from proxykd.eval import tensorboard

FIDELITY_ROWS = ("prior", "proxy", "posterior", "student")


@dataclasses.dataclass
class Run:
  name: str
  path: str
  eval: dict | None
  dpo_rounds: list[dict]
  calibration: dict | None
  curves: dict[str, tensorboard.Curves]


def _json_lines(path: epath.Path) -> list[dict]:
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def read_run(path: epath.PathLike, name: str = "", others: Sequence[str] = ()) -> Run:
  """What the run directory `path` holds (missing pieces are None or empty); the directories of
  `others` (runs of their own, e.g. a student's directory inside this workdir) are left to them."""
  path = epath.Path(path)
  ev = eval_results.read(path)
  cal_path = path / "calibrate" / "table.json"
  calibration = json.loads(cal_path.read_text()) if cal_path.exists() else None
  label = name or (ev or {}).get("name") or path.name
  return Run(label, str(path), ev, _json_lines(path / "proxy_dpo" / "rounds.jsonl"), calibration,
             tensorboard.join_rounds(tensorboard.training_logs(path, others)))


def _task(run: Run, task: str, key: str) -> float | None:
  r = ((run.eval or {}).get("tasks") or {}).get(task)
  v = r.get(key) if r else None
  return float(v) if isinstance(v, (int, float)) else None


def columns(runs: list[Run]) -> list[tuple[str, Any]]:
  """(header, run -> value or None) of every column some run has a value for."""
  cols: list[tuple[str, Any]] = [
      ("GSM8K", lambda r: _task(r, "gsm8k", "accuracy")),
      ("BBH avg", lambda r: _task(r, "bbh", "average")),
      ("synthetic", lambda r: _task(r, "synthetic", "accuracy")),
  ]
  tasks = sorted({t for r in runs for t in ((r.eval or {}).get("tasks") or {})})
  for t in tasks:
    if t.startswith("choice/"):
      cols.append((f"{t[7:]} (MC)", lambda r, t=t: _task(r, t, "accuracy")))
    elif t not in ("gsm8k", "bbh", "synthetic", "heldout", "fidelity"):
      cols.append((t, lambda r, t=t: _task(r, t, "accuracy")))
  cols += [
      ("held-out NLL", lambda r: _task(r, "heldout", "nll")),
      ("held-out top-1", lambda r: _task(r, "heldout", "top1")),
      ("calibrated nats/token", lambda r: _chosen_nats(r)),
  ]
  for row in FIDELITY_ROWS:
    cols.append((f"KL(T‖{row})", lambda r, row=row: _fidelity(r, row, "kl")))
  return [(h, f) for h, f in cols if any(f(r) is not None for r in runs)]


def _chosen_nats(run: Run) -> float | None:
  c = (run.calibration or {}).get("chosen") or {}
  v = c.get("nats_per_token")
  return float(v) if isinstance(v, (int, float)) else None


def _fidelity(run: Run, row: str, key: str) -> float | None:
  f = ((run.eval or {}).get("tasks") or {}).get("fidelity") or {}
  v = (f.get("estimates") or {}).get(row, {}).get(key)
  return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def table(runs: list[Run]) -> str:
  """The markdown comparison table: one row per run, every column some run has."""
  cols = columns(runs)
  lines = ["| run | " + " | ".join(h for h, _ in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
  for r in runs:
    cells = []
    for _, f in cols:
      v = f(r)
      cells.append("–" if v is None else f"{v:.4f}")
    lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def markdown(runs: list[Run], plots: dict[str, str]) -> str:
  """report.md: the table, each run's path, then every plot (relative PNG links)."""
  out = ["# proxykd report", "", table(runs), "Runs:", ""]
  out += [f"- **{r.name}**: `{r.path}`" + ("" if r.eval else " (no eval/results.json)") for r in runs]
  titles = {"training_curves": "Training curves", "dpo_rounds": "Proxy alignment (DPO rounds)",
            "calibration": "Estimator calibration", "bbh_tasks": "BBH per task",
            "fidelity": "Estimator fidelity"}
  for key, file in plots.items():
    out += ["", f"## {titles.get(key, key)}", "", f"![{key}]({file})"]
  fid = [r for r in runs if _fidelity(r, "posterior", "kl") is not None or _fidelity(r, "student", "kl") is not None]
  if fid:
    out += ["", "| run | estimate | KL(T‖·) nats/token | top-1 agreement |", "|---|---|---|---|"]
    for r in fid:
      for row in FIDELITY_ROWS:
        kl, top1 = _fidelity(r, row, "kl"), _fidelity(r, row, "top1")
        if kl is not None:
          out.append(f"| {r.name} | {row} | {kl:.4f} | {top1:.4f} |")
  return "\n".join(out) + "\n"
