"""proxykd entry point.

  python main.py --config=configs/<stage>.py[:variant] --workdir=DIR [--config.a.b=value ...]

The config names its stage (`config.stage`); this dispatches to proxykd/stages/<stage>.py's
`run(config, workdir)`. The resolved config (secrets left out) is written to
<workdir>/<stage>/config.json before the stage starts.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from proxykd import runner

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config: configs/<stage>.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...).")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Call jax.distributed.initialize() first (TPU pods, multi-host GPU). "
    "Cluster settings are auto-detected (TPU, SLURM) or read from JAX_COORDINATOR_ADDRESS, "
    "JAX_NUM_PROCESSES and JAX_PROCESS_ID; see launch/README.md.")


class _QuietLibraries(logging.logging.Filter):
  """Keep our INFO lines; drop the per-save chatter of orbax below WARNING."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/student_kd.py")
  if _MULTIHOST.value:
    runner.initialize_distributed()
  runner.run(config, _WORKDIR.value)


def _parse_flags(argv):
  """absl's parser, with config mistakes (unknown key, bad value) reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError, ValueError, TypeError, flags.Error) as e:
    bad = " ".join(a for a in argv[1:] if a.startswith("--config")) or "the flags"
    text = str(e).strip("\"'")
    if isinstance(e, (AttributeError, KeyError)):
      text = f"unknown config key {text!r}; see the stage's configs/*.py for the known keys"
    print(f"error: {text} (in {bad})", file=sys.stderr)
    sys.exit(2)


def _cli():
  try:
    app.run(main, flags_parser=_parse_flags)
  except runner.UserError as e:  # A mistake the user can fix: one clear line, no traceback.
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _cli()
