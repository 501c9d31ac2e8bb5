"""README promise 1: the demo command, read from README.md, runs as written in a fresh copy of
the repository (minus its `pip install` prefix: this venv has the packages; .ci/run installs them
in a fresh venv) and leaves its outputs under the copy's relative workdir."""
import json
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


def test_readme_demo_runs_as_written(tmp_path):
  command = readme_command("1. Install and run the built-in demo")
  assert command.startswith(INSTALL), command
  command = command[len(INSTALL):]
  workdir = re.search(r"--workdir=(\S+)", command).group(1)
  assert not os.path.isabs(workdir), workdir  # The README's relative workdir, as users type it.
  repo = tmp_path / "proxykd"
  copy_checkout(repo)
  before = _files(repo)
  bin_dir = tmp_path / "bin"  # `python` in the command is this interpreter.
  bin_dir.mkdir()
  (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (bin_dir / "python").chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  env.pop("PYTHONPATH", None)
  proc = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"

  run = repo / workdir
  new = _files(repo) - before
  assert new and all(f.startswith(workdir.rstrip("/") + "/") for f in new), sorted(new)[:10]
  assert sum(1 for _ in (run / "collect" / "corpus.jsonl").open()) > 0
  assert (run / "tokenizer" / "hf" / "tokenizer.json").exists()
  sft = run / "proxy_sft"
  config = json.loads((sft / "config.json").read_text())
  steps = config["train"]["steps"]
  assert (sft / "checkpoints" / str(steps)).is_dir()
  assert not list(run.rglob("*orbax-checkpoint-tmp*"))
  rows = [json.loads(line) for line in (sft / "metrics.jsonl").read_text().splitlines()]
  logged = [(row["step"], key) for row in rows for key in row if key != "step"]
  assert rows and [r["step"] for r in rows] == sorted(r["step"] for r in rows) <= [steps] * len(rows)
  assert len(logged) == len(set(logged))  # No metric of a step written twice.
  hf = sft / "hf"
  assert (hf / "model.safetensors").exists() and (hf / "tokenizer.json").exists()
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(hf)
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
  assert model.config.vocab_size == len(tokenizer)
