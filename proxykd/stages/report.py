"""Stage `report`: runs side by side (proxykd/eval/report.py): one comparison table, PNG plots
(proxykd/eval/plots.py) and `report.md` embedding them, in `config.output` (default
`<workdir>/report/`)."""
from __future__ import annotations

import dataclasses
import json

from absl import logging
from etils import epath

from proxykd import paths, runner
from proxykd.eval import plots, report

STAGE = "report"


def _split(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def run(config, workdir):
  # `runs` holds several paths, so it is no PATH_KEYS key: each is made absolute here.
  dirs = [runner.absolute_path(p) for p in _split(config.runs)]
  if not dirs:
    raise runner.UserError("report: set --config.runs=DIR1,DIR2,... (run directories)")
  names = _split(config.names)
  if names and len(names) != len(dirs):
    raise runner.UserError(f"config.names has {len(names)} labels for {len(dirs)} runs")
  for d in dirs:
    if not epath.Path(d).is_dir():
      raise runner.UserError(f"config.runs: {d} is not a directory")
  runs = [report.read_run(d, names[i] if names else "", [o for o in dirs if o != d])
          for i, d in enumerate(dirs)]
  seen = set()
  for r in runs:  # Labels must tell the runs apart in the table and legends.
    base, k = r.name, 2
    while r.name in seen:
      r.name, k = f"{base} ({k})", k + 1
    seen.add(r.name)
  out = epath.Path(config.output or runner.stage_dir(workdir, STAGE))
  out.mkdir(parents=True, exist_ok=True)
  drawn = {}
  for key, figure in plots.FIGURES.items():
    if figure(runs, out / f"{key}.png"):
      drawn[key] = f"{key}.png"
  paths.write_text(out / "table.md", report.table(runs))
  paths.write_text(out / "report.md", report.markdown(runs, drawn))
  paths.write_text(out / "runs.json", json.dumps(
      [{k: v for k, v in dataclasses.asdict(r).items() if k != "curves"} for r in runs], indent=2))
  logging.info("%s: %d runs, plots %s -> %s\n%s", STAGE, len(runs), sorted(drawn), out,
               report.table(runs))
  print(f"report: {out / 'report.md'}")
  return out
