"""Resolve a stage config, record it in the workdir, and run the stage.

`run` is the one place where paths from the command line become absolute: `--workdir` and every
config value whose key is in PATH_KEYS, against the working directory at entry, before the
resolved config is written to <workdir>/<stage>/config.json and the stage starts. Stages, and the
processes they start, therefore never depend on the working directory (orbax refuses relative
checkpoint paths, and a server started by `collect` may run elsewhere).
"""
from __future__ import annotations

import importlib
import json
import os
import re
from typing import Any

import ml_collections
from etils import epath

from proxykd import paths
from proxykd.errors import UserError  # noqa: F401  (runner.UserError: the stages' spelling)

# Keys whose values must never be written anywhere. `*_env` keys hold the NAME of an environment
# variable, which is not a secret.
_SECRET_KEY = re.compile(r"(api_key|apikey|token|secret|password|authorization)$", re.IGNORECASE)


# Config keys whose values are filesystem paths, matched by the last component of the key at any
# depth (`prompts.path`, `local.checkpoint`, ...). A non-empty string value of such a key that is
# not a URL (gs://, s3://, memory://, ...) is made absolute against the working directory at entry,
# with `~` expanded. A stage that adds a path-valued key adds its name here; a key in this table
# must never hold anything but a path.
PATH_KEYS = frozenset({
    "checkpoint",  # export, serve_teacher, collect.local: a checkpoint root or one step's directory
    "corpus",  # proxy_sft, tokenizer: the teacher corpus (JSON lines)
    "data_dir",  # collect.prompts: the gsm8k / bbh data root
    "hf_dir",  # serve_teacher, collect.local: a Hugging Face model directory
    "input",  # score: the JSONL of (messages, response) to score
    "init_from",  # proxy_sft, proxy_dpo, student_kd: the weights to start from (HF dir or checkpoint)
    "output",  # export: the HF directory to write; collect: the corpus to append to; cache_proxy
    "path",  # collect.prompts: the prompt file of source=file
    "proxy",  # cache_proxy, calibrate, student_kd: the aligned proxy (checkpoint or HF directory)
    "prior",  # calibrate, student_kd, eval.fidelity: the prior stage's directory
    "cache",  # student_kd (offline): the cache_proxy stage's directory
    "teacher_model",  # student_kd baseline=whitebox, eval.fidelity: the teacher's own weights
    "tokenizer",  # proxy_sft, export, serve_teacher, collect.local: a tokenizer directory
    "workdir",  # any stage: the run directory (the fallback when --workdir is not given)
})


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


def absolute_path(path: str) -> str:
  """`path` made absolute against the working directory (`~` expanded); URLs and "" unchanged."""
  if not path or paths.is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with the string values of PATH_KEYS keys, at any depth, made absolute."""
  resolved = config.copy_and_resolve_references()

  def visit(node: ml_collections.ConfigDict) -> None:
    for key in list(node.keys()):
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict):
        visit(value)
      elif key in PATH_KEYS and isinstance(value, str):
        node[key] = absolute_path(value)

  visit(resolved)
  if config.is_locked:
    resolved.lock()
  return resolved


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
  """Run the stage `config.stage` in `workdir` (or config.workdir), paths resolved (PATH_KEYS)."""
  stage = config.get("stage")
  if not stage:
    raise UserError("the config has no `stage` key; every configs/*.py must set config.stage")
  try:
    module = importlib.import_module(f"proxykd.stages.{stage}")
  except ModuleNotFoundError as e:
    if e.name != f"proxykd.stages.{stage}":
      raise
    raise UserError(f"config.stage={stage!r}: there is no proxykd/stages/{stage}.py") from None
  config = resolve_paths(config)
  workdir = absolute_path(workdir or config.get("workdir") or "")
  if not workdir:
    raise UserError(f"--workdir is required for stage {stage!r}")
  # A stage that runs under several names in one workdir (the student and its baselines) writes
  # into <workdir>/<run_name>/.
  from proxykd import hosts  # pylint: disable=g-import-not-at-top  (jax: only when a stage runs)
  if hosts.is_main():
    write_config(config, stage_dir(workdir, config.get("run_name") or stage) / "config.json")
  return module.run(config, workdir)
