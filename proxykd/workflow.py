"""Run a chain of stages in one workdir: skip what is done, resume what is half done, refuse what
was run with other settings.

A step is a stage config and the directory it writes (`<workdir>/<name>/`). When a step finishes,
`<name>/done.json` records the config it ran with (secrets redacted, as `config.json`). On the next
run a step with `done.json` is skipped if its settings are unchanged, and refused otherwise, naming
the keys that differ, unless the user asks to rerun it (`rerun`): that step and every later one are
then run again, their old directories moved to `<workdir>/.rerun/` (never deleted). A step with a
directory but no `done.json` stopped half way: it runs again and resumes itself (every stage is
resumable). Keys that change no result (progress bars, logging and checkpoint cadence) are ignored.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Sequence

import ml_collections
from absl import logging
from etils import epath

from proxykd import hosts, runner

DONE = "done.json"
# Keys (last component) whose values never change what a stage produces.
VOLATILE = frozenset({"progress", "progress_bar", "log_every", "save_every", "eval_every", "keep",
                      "async_save", "wandb", "log_level", "workdir", "pipeline"})


@dataclasses.dataclass
class Step:
  name: str  # the step's directory under the workdir (a stage name or a run_name)
  config: ml_collections.ConfigDict | None  # the stage config (None for a step that is no stage)
  action: Callable[[], Any] | None = None  # does the work instead of the stage (e.g. the table)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      if k not in VOLATILE:
        out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def differences(recorded: dict, wanted: dict) -> list[str]:
  """Dotted keys whose values differ between two resolved configs (volatile keys ignored)."""
  a, b = _flat(recorded), _flat(wanted)
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _settings(config: ml_collections.ConfigDict) -> dict:
  """The config as recorded: JSON round trip of the redacted dict (tuples become lists)."""
  return json.loads(json.dumps(runner.redact(config.to_dict()), default=str))


def _started(out: epath.Path) -> bool:
  """Whether a step's directory holds work beyond its config.json (which the stage writes first;
  the chain's own stage writes it for its directory before any step runs)."""
  return (out / "config.json").exists() and any(p.name != "config.json" for p in out.iterdir())


def _move_aside(workdir: epath.Path, name: str) -> None:
  d = workdir / name
  if d.exists():
    dest = workdir / ".rerun" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    d.rename(dest)
    logging.info("pipeline: moved the old %s to %s", d, dest)


def run(steps: Sequence[Step], workdir: epath.PathLike, rerun: str = "") -> None:
  workdir = epath.Path(workdir)
  names = [s.name for s in steps]
  if rerun and rerun not in names:
    raise runner.UserError(f"config.pipeline.rerun={rerun!r}: not a step of this pipeline; the steps "
                           f"are {names}")
  redo = False
  for i, step in enumerate(steps, start=1):
    where = f"[{i}/{len(steps)}] {step.name}"
    out = workdir / step.name
    config = runner.resolve_paths(step.config) if step.config is not None else None
    wanted = _settings(config) if config is not None else {}
    redo = redo or step.name == rerun
    if redo:
      _move_aside(workdir, step.name)
    elif (out / DONE).exists():
      diff = differences(json.loads((out / DONE).read_text())["config"], wanted)
      if not diff:
        logging.info("%s: done already, skipped", where)
        print(f"{where}: done already, skipped", flush=True)
        continue
      raise runner.UserError(
          f"{out} was made with other settings than this pipeline's ({', '.join(diff[:4])}"
          f"{' ...' if len(diff) > 4 else ''}); rerun it and every later step with "
          f"--config.pipeline.rerun={step.name}, or use another --workdir")
    elif config is not None and _started(out):
      diff = differences(json.loads((out / "config.json").read_text()), wanted)
      if diff:
        raise runner.UserError(
            f"{out} holds a half-finished run with other settings ({', '.join(diff[:4])}); rerun "
            f"it with --config.pipeline.rerun={step.name}, or use another --workdir")
      logging.info("%s: resuming a half-finished run", where)
    print(f"{where}", flush=True)
    logging.info("%s", where)
    start = time.perf_counter()
    if step.action is not None:
      step.action()
    else:
      runner.run(config, str(workdir))
    if not hosts.is_main():
      continue
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE).write_text(json.dumps({"config": wanted, "seconds": round(time.perf_counter() - start, 1),
                                        "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2))
