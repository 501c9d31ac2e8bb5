"""Resolve a stage config, record it in the workdir, and run the stage."""
from __future__ import annotations

import importlib
import json
import os
import re
from typing import Any

import ml_collections
from etils import epath

# Keys whose values must never be written anywhere. `*_env` keys hold the NAME of an environment
# variable, which is not a secret.
_SECRET_KEY = re.compile(r"(api_key|apikey|token|secret|password|authorization)$", re.IGNORECASE)


class UserError(Exception):
  """An error the user caused and can fix (bad config key, malformed file, ...)."""


def redact(tree: Any) -> Any:
  """A copy of a (nested) dict with secret-looking values replaced by '<redacted>'."""
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      secret = _SECRET_KEY.search(str(k)) and not str(k).endswith("_env") and v not in (None, "")
      out[k] = "<redacted>" if secret else redact(v)
    return out
  if isinstance(tree, (list, tuple)):
    return [redact(v) for v in tree]
  return tree


def write_config(config: ml_collections.ConfigDict, path: epath.PathLike) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(redact(config.to_dict()), indent=2, sort_keys=True, default=str))


def stage_dir(workdir: epath.PathLike, stage: str) -> epath.Path:
  """`<workdir>/<stage>/`: where a stage writes its outputs and later stages look for them."""
  return epath.Path(workdir) / stage


def initialize_distributed() -> None:
  """Join a multi-process JAX run: auto-detected on TPU/SLURM, else from JAX_* variables."""
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                  num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)


def run(config: ml_collections.ConfigDict, workdir: str | None) -> Any:
  stage = config.get("stage")
  if not stage:
    raise UserError("the config has no `stage` key; every configs/*.py must set config.stage")
  try:
    module = importlib.import_module(f"proxykd.stages.{stage}")
  except ModuleNotFoundError as e:
    if e.name != f"proxykd.stages.{stage}":
      raise
    raise UserError(f"config.stage={stage!r}: there is no proxykd/stages/{stage}.py") from None
  workdir = workdir or config.get("workdir") or None
  if workdir is None:
    raise UserError("--workdir is required for stage " + repr(stage))
  write_config(config, stage_dir(workdir, stage) / "config.json")
  return module.run(config, workdir)
