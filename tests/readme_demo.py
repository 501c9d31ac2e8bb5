"""README command 1, read from README.md and run as written in a fresh copy of the repository
(minus its `pip install` prefix: the test venv has the packages; .ci/run installs them in a fresh
venv). tests/test_demo.py checks what it leaves; the notebooks are executed on its output."""
import os
import re
import shutil
import subprocess
import sys

from conftest import REPO

INSTALL = "pip install -r requirements.txt && "


def readme_command(item: str) -> str:
  """The command under README "Set-up" item `item` ("1. Install ..."): its first indented line.

  .ci/run reads the same lines with the same rule.
  """
  lines = (REPO / "README.md").read_text().splitlines()
  start = next((i for i, line in enumerate(lines) if line.startswith(item)), None)
  assert start is not None, f"README.md has no line starting with {item!r}"
  body = next((line for line in lines[start + 1:] if line.strip()), "")
  assert body.startswith("    "), f"README.md: no indented command right under {item!r}"
  return body.strip()


def copy_checkout(dest):
  """The repository's files as a fresh clone would have them (tracked + new, not ignored)."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
  for name in filter(None, listed):
    if (REPO / name).is_file():  # Deleted in the working tree but still in the index: skip.
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(REPO / name, dest / name)


def _files(root):
  return {p.relative_to(root).as_posix() for p in root.rglob("*")
          if p.is_file() and "__pycache__" not in p.parts}


DEFAULT_WORKDIR = "runs/demo"  # configs/student_kd.py's, when the command gives no --workdir


def run_readme_demo(tmp_path) -> tuple:
  """README command 1 as written (minus `pip install`) in a fresh copy of the checkout, run twice:
  -> (the copy, its workdir, the first run's process, the second's, the files the runs added)."""
  command = readme_command("1. Install and run the built-in demo")
  assert command.startswith(INSTALL), command
  command = command[len(INSTALL):]
  given = re.search(r"--workdir=(\S+)", command)
  workdir = given.group(1) if given else DEFAULT_WORKDIR
  assert not os.path.isabs(workdir), workdir  # A relative workdir, as users type it.
  repo = tmp_path / "proxykd"
  copy_checkout(repo)
  shared = REPO.parent / "shared"  # ../shared beside the copy, as beside the checkout (.ci/run too)
  if shared.is_dir():
    (tmp_path / "shared").symlink_to(shared)
  before = _files(repo)
  bin_dir = tmp_path / "bin"  # `python` in the command is this interpreter.
  bin_dir.mkdir()
  (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (bin_dir / "python").chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  env.pop("PYTHONPATH", None)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # as a user's shell
  run = lambda: subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True,
                               text=True, timeout=1800)
  first = run()
  assert first.returncode == 0, f"{command}\n{first.stderr[-4000:]}"
  added = _files(repo) - before
  second = run()
  assert second.returncode == 0, f"{command} (again)\n{second.stderr[-4000:]}"
  return repo, repo / workdir, first, second, added, workdir
