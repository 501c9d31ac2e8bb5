"""An evaluation's results: `results.json` and the same as a markdown table, `results.md`.

`results.json`: {"name", "model", "tokenizer", "tasks": {task: {...}}} where a generative task has
`accuracy`, `correct`, `total` (BBH also `average`, the macro average over its tasks, and `groups`,
each task's accuracy), a multiple-choice benchmark `choice/<name>` has `accuracy`,
`accuracy_per_token` and `accuracy_per_byte`, `heldout` has `nll` and `top1`, and `fidelity` has
`estimates` ({prior, proxy, posterior, posterior_no_label, student}: {kl, top1}), `teacher_entropy`
and `tokens` (proxykd/eval/fidelity.py).
"""
from __future__ import annotations

import json

from etils import epath

from proxykd import paths

RESULTS, MARKDOWN = "results.json", "results.md"


def headline(task: str, r: dict) -> tuple[str, float]:
  """The one number a task is summarised by: (what it is, value)."""
  if task == "bbh":
    return "average accuracy", r["average"]
  if task == "heldout":
    return "NLL (nats/token)", r["nll"]
  return "accuracy", r["accuracy"]


def markdown(results: dict) -> str:
  lines = [f"# Evaluation of {results['name']}", "", f"Model: `{results['model']}`", "",
           "| task | metric | value | items |", "|---|---|---|---|"]
  for task, r in results["tasks"].items():
    if task == "fidelity":
      for name, e in r["estimates"].items():
        lines.append(f"| fidelity | KL(teacher ‖ {name}) nats/token; top-1 {e['top1']:.4f} | "
                     f"{e['kl']:.4f} | {r['tokens']} tokens |")
      lines.append(f"| fidelity | teacher entropy | {r['teacher_entropy']:.4f} | {r['tokens']} tokens |")
      continue
    what, value = headline(task, r)
    lines.append(f"| {task} | {what} | {value:.4f} | {r.get('total', r.get('records', ''))} |")
    if task.startswith("choice/"):
      for k in ("accuracy_per_token", "accuracy_per_byte"):
        lines.append(f"| {task} | {k.replace('_', ' ')} | {r[k]:.4f} | {r['total']} |")
    if task == "heldout":
      lines.append(f"| heldout | top-1 agreement | {r['top1']:.4f} | {r['tokens']} tokens |")
  for task, r in results["tasks"].items():
    if "groups" in r:
      lines += ["", f"## {task} per task", "", "| task | accuracy | items |", "|---|---|---|"]
      lines += [f"| {g} | {v['accuracy']:.4f} | {v['total']} |" for g, v in r["groups"].items()]
  return "\n".join(lines) + "\n"


def write(out_dir: epath.PathLike, results: dict) -> None:
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths.write_text(out_dir / RESULTS, json.dumps(results, indent=2, sort_keys=False))
  paths.write_text(out_dir / MARKDOWN, markdown(results))


def read_dir(out_dir: epath.PathLike) -> dict | None:
  """`<out_dir>/results.json` (an eval stage's output directory), or None."""
  path = epath.Path(out_dir) / RESULTS
  return json.loads(path.read_text()) if path.exists() else None


def read(run_dir: epath.PathLike) -> dict | None:
  """A run's results: `<run_dir>/eval/results.json`, or None if the run has none."""
  return read_dir(epath.Path(run_dir) / "eval")
