"""main.py's own messages: --help, and one line per command-line mistake, printed once."""
import re
import subprocess
import sys

import pytest

from configs import common
from conftest import REPO


def _main(*args, cwd=REPO):
  return subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=120)


def _one_error_line(proc) -> str:
  """The single `error: ...` line of a refused command, checked to be all it printed."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and proc.stdout == ""
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  return lines[0]


def test_help_lists_every_stage_with_its_variant_flags():
  proc = _main("--help")
  assert proc.returncode == 0, proc.stderr[-3000:]
  stages = sorted(p.name for p in (REPO / "configs").glob("*.py") if p.name != "common.py")
  assert len(stages) >= 5
  for name in stages:
    assert f"configs/{name}\n" in proc.stdout
  assert "cannot load" not in proc.stdout
  # Variant flags come from the config's own parse_arg call, defaults included.
  assert "variant flags: runlocal, model=tiny, mesh=fsdp" in proc.stdout
  assert "Warm-up SFT of the proxy" in proc.stdout  # The module docstring's first line.
  assert "--workdir" in proc.stdout and "--config.a.b=value" in proc.stdout


def test_no_config_names_configs_that_exist():
  line = _one_error_line(_main())
  assert line.startswith("error: --config is required, e.g. --config=configs/collect.py:runlocal")
  named = re.findall(r"configs/(\w+)\.py", line)
  assert {"collect", "export", "proxy_sft", "tokenizer"} <= set(named)
  assert all((REPO / "configs" / f"{name}.py").exists() for name in named), named
  assert "common" not in named  # not a stage


def test_missing_config_file_is_one_line():
  line = _one_error_line(_main("--config=configs/nope.py", "--workdir=/tmp/unused"))
  assert line.startswith("error: config file configs/nope.py does not exist")


def test_bad_variant_is_not_called_a_config_key():
  line = _one_error_line(_main("--config=configs/proxy_sft.py:nosuch", "--workdir=/tmp/unused"))
  assert line == ("error: configs/proxy_sft.py: unknown variant flag 'nosuch'; "
                  "known: ['mesh', 'model', 'pod', 'runlocal']")
  line = _one_error_line(_main("--config=configs/proxy_sft.py:runlocal=maybe", "--workdir=/tmp/x"))
  assert "runlocal=maybe" in line and "boolean" in line
  line = _one_error_line(_main("--config=configs/export.py:runlocal", "--workdir=/tmp/unused"))
  assert line == ("error: configs/export.py: unknown variant flag 'runlocal'; "
                  "this config takes no variant flags")


def test_unknown_key_names_the_dotted_key_unescaped(tmp_path):
  line = _one_error_line(_main("--config=configs/proxy_sft.py", f"--workdir={tmp_path}",
                               "--config.train.no_such_key=1"))
  assert line.startswith("error: unknown config key 'train.no_such_key' (in "
                         "--config.train.no_such_key=1); the keys under 'train' are: ")
  assert "save_every" in line and "\\" not in line and '"' not in line
  line = _one_error_line(_main("--config=configs/export.py", f"--workdir={tmp_path}",
                               "--config.stage.x=1"))
  assert "'stage.x'" in line and "'stage' is a str" in line
  assert not list(tmp_path.iterdir())  # Nothing ran.


def test_bad_value_is_one_line(tmp_path):
  line = _one_error_line(_main("--config=configs/export.py", f"--workdir={tmp_path}",
                               "--config.max_shard_gb=abc"))
  assert "--config.max_shard_gb=abc" in line and "'abc'" in line


def test_stage_errors_are_printed_once(tmp_path):
  line = _one_error_line(_main("--config=configs/export.py", f"--workdir={tmp_path}"))
  assert line == "error: export: set --config.checkpoint=PATH (a checkpoint directory)"
  line = _one_error_line(_main("--config=configs/export.py"))
  assert line == "error: --workdir is required for stage 'export'"
  line = _one_error_line(_main("--config=configs/export.py", f"--workdir={tmp_path}", "stray"))
  assert "unexpected arguments 'stray'" in line


def test_parse_arg_refuses_bad_variants_and_records_flags():
  assert common.parse_arg("a,b=3", a=False, b=1).to_dict() == {"a": True, "b": 3}
  with pytest.raises(common.VariantError, match="unknown variant flag 'c'"):
    common.parse_arg("c", a=False)
  with pytest.raises(common.VariantError, match="expected int"):
    common.parse_arg("b=x", b=1)
  with pytest.raises(common.VariantError, match="boolean"):
    common.parse_arg("a=maybe", a=False)
  with pytest.raises(common.VariantError, match="unknown model preset"):
    common.model_config("nosuch")

  def get_config(arg=None):
    return common.parse_arg(arg, runlocal=False, n=1)

  assert common.variant_flags(get_config) == {"runlocal": False, "n": 1}
  assert common.variant_flags(lambda arg=None: None) == {}
