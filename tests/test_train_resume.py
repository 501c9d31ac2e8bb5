"""The proxy_sft stage end to end: kill -9 mid-run, resume, same losses; HF export of the result."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import sft_fixtures
from conftest import REPO

STEPS = 60
FLAGS = [f"--config.train.steps={STEPS}", "--config.train.save_every=4", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.progress_bar=False",
         "--config.split_name=all"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("collect")
  records = sft_fixtures.synthetic_records(150)
  sft_fixtures.write_corpus(root / "corpus.jsonl", records)
  sft_fixtures.demo_tokenizer(root / "tokenizer", records)
  return root


def _command(workdir, corpus_dir, *extra):
  return [sys.executable, "main.py", "--config=configs/proxy_sft.py:runlocal", f"--workdir={workdir}",
          f"--config.corpus={corpus_dir / 'corpus.jsonl'}",
          f"--config.tokenizer={corpus_dir / 'tokenizer'}", *FLAGS, *extra]


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _run(cmd):
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _losses(workdir):
  rows = sft_fixtures.read_metrics(workdir / "proxy_sft" / "metrics.jsonl")
  return {s: r["train/loss"] for s, r in rows.items() if "train/loss" in r}


def test_kill_9_then_resume_matches_uninterrupted_run_and_exports_hf(tmp_path, corpus_dir):
  straight = tmp_path / "straight"
  _run(_command(straight, corpus_dir))
  reference = _losses(straight)
  assert sorted(reference) == list(range(1, STEPS + 1))
  assert reference[STEPS] < reference[1]

  killed = tmp_path / "killed"
  metrics_file = killed / "proxy_sft" / "metrics.jsonl"
  proc = subprocess.Popen(_command(killed, corpus_dir, "--config.export=False"), cwd=REPO,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics_file.exists() and max(_losses(killed), default=0) >= 14:
      os.kill(proc.pid, signal.SIGKILL)
      break
    time.sleep(0.01)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
  seen = max(_losses(killed))
  assert 14 <= seen < STEPS
  steps_on_disk = sorted(int(p.name) for p in (killed / "proxy_sft" / "checkpoints").iterdir()
                         if p.name.isdigit())
  assert steps_on_disk and max(steps_on_disk) < STEPS

  resumed = _run(_command(killed, corpus_dir, "--config.export=False"))
  assert "resumed from" in resumed.stderr
  after = _losses(killed)  # The resumed run's lines come last and win.
  assert sorted(after) == list(range(1, STEPS + 1))
  for s in range(1, STEPS + 1):
    assert after[s] == pytest.approx(reference[s], abs=1e-6), (s, after[s], reference[s])

  # The uninterrupted run also exported an HF directory equal to its last checkpoint.
  from proxykd.models import hf_io  # pylint: disable=g-import-not-at-top
  from proxykd.models import checkpoint  # pylint: disable=g-import-not-at-top
  exported, cfg = hf_io.load_hf(straight / "proxy_sft" / "hf")
  params, meta = checkpoint.restore_params(straight / "proxy_sft" / "checkpoints")
  assert meta["model"]["vocab_size"] == cfg.vocab_size and meta["split"] == "all"
  np.testing.assert_array_equal(exported["layers"]["mlp"]["up"]["kernel"],
                                params["layers"]["mlp"]["up"]["kernel"])
  assert (straight / "proxy_sft" / "hf" / "tokenizer.json").exists()
  assert list((straight / "proxy_sft" / "tensorboard").glob("events.out.tfevents.*"))
