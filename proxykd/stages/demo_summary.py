"""The end-to-end demo's comparison table: the distilled student against its SFT baseline.

Held-out teacher NLL and accuracies come from each student's `eval/results.json`, the estimator's
nats/token (prior only, proxy only, posterior) from `calibrate/chosen.json`. Printed, and written
to `<workdir>/summary/table.md` and `table.json`.
"""
from __future__ import annotations

import json
import subprocess

from etils import epath

from proxykd.eval.results import RESULTS

ROWS = (("heldout", "nll", "held-out teacher NLL (nats/token, lower is better)"),
        ("heldout", "top1", "held-out top-1 agreement with the teacher"),
        ("synthetic", "accuracy", "accuracy on held-out synthetic problems"),
        ("gsm8k", "accuracy", "accuracy on the GSM8K slice"))


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=epath.Path(__file__).parent, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def table(workdir: epath.PathLike, students: list[str]) -> dict:
  workdir = epath.Path(workdir)
  results = {s: json.loads((workdir / s / "eval" / RESULTS).read_text())["tasks"] for s in students}
  rows = []
  for task, key, what in ROWS:
    if all(task in r for r in results.values()):
      rows.append({"what": what, **{s: results[s][task][key] for s in students}})
  chosen_path = workdir / "calibrate" / "chosen.json"
  estimator = {}
  if chosen_path.exists():
    chosen = json.loads(chosen_path.read_text())
    estimator = {"prior only": chosen["prior_only_nats_per_token"],
                 "proxy only": chosen["proxy_only_nats_per_token"],
                 "posterior": chosen["nats_per_token"],
                 "setting": {k: chosen[k] for k in ("kappa", "m", "tau", "order", "smoothing")}}
  return {"students": students, "rows": rows, "estimator": estimator, "commit": _commit()}


def markdown(t: dict) -> str:
  students = t["students"]
  lines = ["| | " + " | ".join(students) + " |", "|---|" + "---|" * len(students)]
  for row in t["rows"]:
    lines.append(f"| {row['what']} | " + " | ".join(f"{row[s]:.4f}" for s in students) + " |")
  if t["estimator"]:
    e = t["estimator"]
    lines += ["", "Estimator on held-out teacher tokens, without the label (nats/token, lower is "
              f"better): prior only {e['prior only']:.4f}, proxy only {e['proxy only']:.4f}, "
              f"posterior {e['posterior']:.4f} (calibrated: {e['setting']})."]
  nll = next((r for r in t["rows"] if r["what"].startswith("held-out teacher NLL")), None)
  if nll is not None and len(students) == 2:
    a, b = students
    verdict = "beats" if nll[a] < nll[b] else "does NOT beat"
    lines += ["", f"{a} {verdict} {b} on held-out teacher NLL ({nll[a]:.4f} vs {nll[b]:.4f})."]
  lines += ["", f"(commit {t['commit']})"]
  return "\n".join(lines)


def write(workdir: epath.PathLike, students: list[str]) -> str:
  t = table(workdir, students)
  out = epath.Path(workdir) / "summary"
  out.mkdir(parents=True, exist_ok=True)
  text = markdown(t)
  (out / "table.json").write_text(json.dumps(t, indent=2))
  (out / "table.md").write_text(text + "\n")
  print("\n" + text + "\n", flush=True)
  return text
