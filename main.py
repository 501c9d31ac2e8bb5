"""proxykd entry point.

  python main.py --config=configs/<stage>.py[:variant] --workdir=DIR [--config.a.b=value ...]

The config names its stage (`config.stage`); this dispatches to proxykd/stages/<stage>.py's
`run(config, workdir)`. `--workdir` and the config's path values are made absolute against the
current directory first (proxykd/runner.py, PATH_KEYS), and the resolved config (secrets left out)
is written to <workdir>/<stage>/config.json before the stage starts. `python main.py --help` lists
the stages and their variant flags.

A mistake on the command line (a missing config file, a bad variant, an unknown key, a bad value)
or in a stage's inputs (runner.UserError) is reported as one line on stderr, `error: ...`, exit
status 2.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from configs import common
from proxykd import runner

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
_NOT_STAGES = ("common.py", "__init__.py")
_HELP = ("--help", "-help", "-h", "--helpshort", "-?")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config: configs/<stage>.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: a local path (made absolute) or a URL such as gs://bucket/run.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (TPU pods, multi-host GPU). "
    "Cluster settings are auto-detected (TPU, SLURM) or read from JAX_COORDINATOR_ADDRESS, "
    "JAX_NUM_PROCESSES and JAX_PROCESS_ID; see launch/README.md.")


class _QuietLibraries(logging.logging.Filter):
  """Keep our INFO lines; drop the per-save chatter of orbax below WARNING."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def _fail(message: str) -> NoReturn:
  """The one way a user's mistake ends the program: one line on stderr, exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def _shown(path: Path) -> str:
  """`path` relative to the current directory when it lies under it, else absolute."""
  rel = os.path.relpath(path)
  return path.as_posix() if rel.startswith("..") else Path(rel).as_posix()


def stage_configs() -> list[Path]:
  """Every stage config file, configs/<stage>.py, sorted."""
  return sorted(p for p in CONFIGS_DIR.glob("*.py") if p.name not in _NOT_STAGES)


def _available() -> str:
  return ", ".join(_shown(p) for p in stage_configs())


def _example() -> str:
  """A --config value that exists: the demo's first stage when present."""
  names = [p.name for p in stage_configs()]
  if "collect.py" in names:
    return f"{_shown(CONFIGS_DIR / 'collect.py')}:runlocal"
  return _shown(stage_configs()[0]) if names else "configs/<stage>.py"


def _load_config_module(path: str) -> ModuleType:
  spec = importlib.util.spec_from_file_location(f"proxykd_cli_config_{Path(path).stem}", path)
  if spec is None or not path.endswith(".py"):
    _fail(f"config file {path} is not a Python file (configs/<stage>.py)")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _describe_variants(spec: dict[str, Any]) -> str:
  if not spec:
    return "none"
  return ", ".join(k if v is False else f"{k}={v}" for k, v in spec.items())


def usage() -> str:
  """The --help text: the command line, then every stage with its description and variant flags."""
  lines = [
      "usage: python main.py --config=configs/<stage>.py[:variant] --workdir=DIR "
      "[--config.a.b=value ...] [--multihost]",
      "",
      "Stages (a bare variant flag sets it to true; join several with commas, e.g. "
      "configs/proxy_sft.py:runlocal,model=small):",
  ]
  for path in stage_configs():
    try:
      module = _load_config_module(str(path))
      doc = (module.__doc__ or "").strip().splitlines()
      about = re.sub(r"^Stage `\w+`: ", "", doc[0]) if doc else ""
      about = about[:1].upper() + about[1:]
      variants = _describe_variants(common.variant_flags(module.get_config))
    except Exception as e:  # pylint: disable=broad-except  # One broken config must not hide the rest.
      about, variants = f"(cannot load: {type(e).__name__}: {e})", "?"
    lines += [f"  {_shown(path)}", f"      {about}", f"      variant flags: {variants}"]
  lines += [
      "",
      "Flags:",
      f"  --workdir     {flags.FLAGS[_WORKDIR.name].help}",
      "  --config.a.b=value  override any key of the stage's config; an unknown key is refused.",
      f"  --multihost   {flags.FLAGS[_MULTIHOST.name].help}",
      "  --helpfull    every absl flag.",
  ]
  return "\n".join(lines)


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config in `argv` (`--config=X` or `--config X`), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _unknown_key(config: ml_collections.ConfigDict, argv: list[str]) -> str | None:
  """The first `--config.a.b` override naming a key that `config` lacks, described; else None."""
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    path = match.group(1)
    node, walked = config, []
    for part in path.split("."):
      name = re.sub(r"(\[\d+\])+$", "", part)  # `a.b[0]`: an element of the sequence a.b.
      if not isinstance(node, ml_collections.ConfigDict):
        return (f"unknown config key {path!r} (in {arg}): {'.'.join(walked)!r} is a "
                f"{type(node).__name__}, not a group of keys")
      if name not in node:
        where = f"under {'.'.join(walked)!r}" if walked else "at the top level"
        return (f"unknown config key {path!r} (in {arg}); the keys {where} are: "
                f"{', '.join(sorted(node.keys()))}")
      node = node[name]
      walked.append(name)
  return None


def _check_config(spec: str, argv: list[str]) -> None:
  """Refuse, in one line each, a missing config file, a bad variant and an unknown key."""
  path = spec.split(":", 1)[0]
  if not path:
    _fail(f"--config is empty; e.g. --config={_example()} (available: {_available()})")
  if not os.path.isfile(path):
    _fail(f"config file {path} does not exist (available: {_available()})")
  module = _load_config_module(path)
  if not callable(getattr(module, "get_config", None)):
    _fail(f"config file {path} has no get_config(arg) function")
  try:
    config = module.get_config(*spec.split(":", 1)[1:])  # As config_flags calls it.
  except common.VariantError as e:
    _fail(f"{path}: {e}")
  if isinstance(config, ml_collections.ConfigDict):
    message = _unknown_key(config, argv)
    if message:
      _fail(message)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with --help and every command-line mistake handled here in one line."""
  if any(a in _HELP for a in argv[1:]):
    try:
      print(usage(), flush=True)
    except BrokenPipeError:  # `python main.py --help | head`: not an error.
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(0)
  spec = _config_spec(argv[1:])
  if spec is not None:
    _check_config(spec, argv[1:])
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, ValueError, TypeError, flags.Error) as e:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    text = " ".join(str(text).split())  # One line, whatever the library put in it.
    if "--config" not in text and "--workdir" not in text:
      text += f" (in {' '.join(argv[1:])})"
    _fail(text)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])!r}; flags take the form --name=value "
          "(python main.py --help)")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if config is None:
    _fail(f"--config is required, e.g. --config={_example()} (available: {_available()}; "
          "python main.py --help lists their variants)")
  if _MULTIHOST.value:
    runner.initialize_distributed()
  runner.run(config, _WORKDIR.value)


def _cli() -> None:
  try:
    app.run(main, flags_parser=_parse_flags)
  except runner.UserError as e:  # A mistake the user can fix: one clear line, no traceback.
    _fail(str(e))


if __name__ == "__main__":
  _cli()
