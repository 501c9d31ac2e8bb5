"""Shared test set-up: CPU only, offline, and helpers for multi-device runs in a subprocess."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_python(code: str, devices: int = 1, timeout: int = 300, env: dict | None = None) -> str:
  """Run `code` in a fresh interpreter with `devices` simulated CPU devices; return its stdout.

  XLA_FLAGS must be set before jax is imported, hence the subprocess.
  """
  full_env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                  XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                        text=True, timeout=timeout, env=full_env, cwd=REPO)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
  return proc.stdout


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory):
  """A small BPE tokenizer with a chat template, trained on local text (no download)."""
  from proxykd.models.tokenizer import build_demo_tokenizer
  texts = [f"Tom has {a} apples and buys {b} more. {a} + {b} = {a + b}\n#### {a + b}"
           for a in range(40) for b in range(0, 40, 3)]
  out = tmp_path_factory.mktemp("tokenizer")
  build_demo_tokenizer(out, texts, vocab_size=384)
  return out


# One persistent compilation cache for this test session, shared with the subprocesses it starts
# (multi-device runs, kill -9 / resume runs) so that each program compiles once per run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile  # noqa: E402
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="proxykd-jax-cache-")


def run_main(*args, timeout: int = 400, **kwargs) -> subprocess.CompletedProcess:
  """`python main.py ARGS` from the repository, on one CPU device; stdout/stderr captured."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="session")
def warm_workdir(tmp_path_factory):
  """A workdir with a teacher corpus (240 synthetic records), a tokenizer and a warm-up SFT proxy
  (configs/proxy_sft.py:runlocal, 10% held out). Tests copy the stages they need from it."""
  import sft_fixtures  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("warm")
  records = sft_fixtures.synthetic_records(240, seed=5)
  sft_fixtures.write_corpus(root / "collect" / "corpus.jsonl", records)
  sft_fixtures.demo_tokenizer(root / "tokenizer" / "hf", records)
  proc = run_main("--config=configs/proxy_sft.py:runlocal", f"--workdir={root}",
                  "--config.split.heldout=0.1", "--config.train.progress_bar=False",
                  "--config.export=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return root


def copy_stages(src, dst, *stages):
  """A new workdir `dst` with copies of `src`'s stage directories."""
  import shutil  # pylint: disable=g-import-not-at-top
  for stage in stages:
    shutil.copytree(src / stage, dst / stage)
  return dst


@pytest.fixture(scope="session")
def readme_demo(tmp_path_factory):
  """README command 1 run as written in a copy of the checkout, twice (tests/readme_demo.py)."""
  from readme_demo import run_readme_demo  # pylint: disable=g-import-not-at-top
  return run_readme_demo(tmp_path_factory.mktemp("readme_demo"))
