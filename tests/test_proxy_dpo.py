"""The proxy_dpo stage end to end on a tiny proxy: alignment raises held-out agreement with the
teacher, round 2 samples from round 1's result, and kill -9 mid-round then resume equals an
uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, copy_stages

SPLIT = ["--config.split.heldout=0.1"]  # Enough held-out prompts to measure agreement.
DPO_FLAGS = [*SPLIT, "--config.train.progress_bar=False", "--config.train.save_every=3",
             "--config.train.async_save=False", "--config.dpo.temperature=0"]


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _dpo(workdir):
  return [sys.executable, "main.py", "--config=configs/proxy_dpo.py:runlocal", f"--workdir={workdir}",
          *DPO_FLAGS]


def _rounds(workdir):
  lines = (workdir / "proxy_dpo" / "rounds.jsonl").read_text().splitlines()
  return {r["round"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def straight(warm_workdir, tmp_path_factory):
  workdir = copy_stages(warm_workdir, tmp_path_factory.mktemp("straight") / "w", "collect",
                        "tokenizer", "proxy_sft")
  proc = subprocess.run(_dpo(workdir), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_alignment_raises_heldout_agreement_and_samples_come_from_the_current_proxy(straight):
  rounds = _rounds(straight)
  assert sorted(rounds) == [0, 1, 2]
  assert rounds[2]["heldout_top1"] > rounds[0]["heldout_top1"], rounds
  assert rounds[1]["pairs"] > 0 and rounds[1]["dpo/accuracy"] > 0.5
  assert rounds[1]["compiles"] + rounds[2]["compiles"] <= 4

  from proxykd.data import corpus, tokenize  # pylint: disable=g-import-not-at-top
  from proxykd.models import checkpoint  # pylint: disable=g-import-not-at-top
  from proxykd.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from proxykd.models.sampling import Sampler  # pylint: disable=g-import-not-at-top
  from proxykd.models.tokenizer import end_of_turn_ids, load_tokenizer  # pylint: disable=g-import-not-at-top
  tok = load_tokenizer(straight / "tokenizer" / "hf")
  samples = [json.loads(l) for l in (straight / "proxy_dpo" / "rounds" / "002" / "samples.jsonl")
             .read_text().splitlines()][:6]
  by_id = {r["id"]: r for r in corpus.read_corpus(straight / "collect" / "corpus.jsonl")}
  examples, _ = tokenize.tokenize([by_id[s["id"]] for s in samples], tok)
  prompts = [e.ids[:int(np.argmax(e.loss_mask))].tolist() for e in examples]
  round1, _ = checkpoint.restore_params(straight / "proxy_dpo" / "rounds" / "001" / "checkpoints")
  warmup, _ = checkpoint.restore_params(straight / "proxy_sft" / "checkpoints")
  cfg = ModelConfig.from_dict(checkpoint.restore_meta(straight / "proxy_sft" / "checkpoints")["model"])
  sampler = Sampler(cfg)
  greedy = lambda params: [g.tokens for g in sampler.generate(params, prompts, max_new_tokens=96,
                                                              eos_ids=end_of_turn_ids(tok))]
  assert greedy(round1) == [s["tokens"] for s in samples]  # Round 2 sampled round 1's result ...
  assert greedy(warmup) != [s["tokens"] for s in samples]  # ... not the warm-up model.


def test_kill_9_mid_round_then_resume_equals_an_uninterrupted_run(warm_workdir, straight, tmp_path):
  workdir = copy_stages(warm_workdir, tmp_path / "killed", "collect", "tokenizer", "proxy_sft")
  proc = subprocess.Popen(_dpo(workdir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = workdir / "proxy_dpo" / "rounds" / "001" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
      os.kill(proc.pid, signal.SIGKILL)  # Round 1 is training: a checkpoint is on disk.
      break
    time.sleep(0.02)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
  assert not (workdir / "proxy_dpo" / "rounds.jsonl").exists() or 1 not in _rounds(workdir)
  resumed = subprocess.run(_dpo(workdir), cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=400)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr
  timing = ("sample_seconds", "train_seconds", "compiles")
  a, b = _rounds(straight), _rounds(workdir)
  assert sorted(a) == sorted(b)
  for k in a:
    for key, value in a[k].items():
      if key in timing:
        continue
      if isinstance(value, float):
        assert b[k][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (k, key)
      else:
        assert b[k][key] == value, (k, key)
  from proxykd.models.safetensors_io import SafetensorsFile  # pylint: disable=g-import-not-at-top
  x = SafetensorsFile(str(straight / "proxy_dpo" / "hf" / "model.safetensors"))
  y = SafetensorsFile(str(workdir / "proxy_dpo" / "hf" / "model.safetensors"))
  for name in x.keys():
    np.testing.assert_allclose(x.get(name), y.get(name), atol=1e-6)
