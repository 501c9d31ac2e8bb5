"""Training with the workdir in a GCS bucket: `tokenizer`, `proxy_sft` (and its resume) and `export`
on gs://bucket/run, served by a GCS emulator on loopback (tests/gcs_emulator.py).

The stages run as `python main.py ...` with the emulator's address in the environment, so every
gs:// access goes through the real clients: etils.epath over gcsfs (configs, corpus, tokenizer,
metrics, TensorBoard, the rows cache, the HF export, orbax's directories and JSON items) and
tensorstore's gcs driver (orbax's arrays). Nothing may land in the local working directory, and
every temporary local copy must be gone when a stage ends.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend

import gcs_emulator
import sft_fixtures
from configs import tokenizer as tokenizer_config
from conftest import REPO
from proxykd import paths, runner
from proxykd.models import checkpoint, hf_io
from proxykd.models.tokenizer import load_tokenizer

WORKDIR = "gs://bucket/run"

def _forget_gcs_clients() -> None:
  """Drop cached gcsfs clients, which hold the emulator address they were created with."""
  import gcsfs  # pylint: disable=g-import-not-at-top
  epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def gcs_env():
  """The emulator, and this process pointed at it (for seeding and checking the bucket)."""
  with gcs_emulator.running() as url, pytest.MonkeyPatch.context() as mp:
    env = gcs_emulator.client_env(url)
    for k, v in env.items():
      mp.setenv(k, v)
    _forget_gcs_clients()
    try:
      yield env
    finally:
      _forget_gcs_clients()


def _main(cwd, tmpdir, *args) -> str:
  """`python main.py ARGS` in `cwd` (the gs:// settings come from os.environ) -> its stderr."""
  env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmpdir))
  proc = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-4000:]
  _forget_gcs_clients()  # Their cached listings predate what the stage wrote.
  return proc.stderr


def _train_steps(path: epath.Path) -> list[int]:
  """The steps of metrics.jsonl's train/loss lines, in file order."""
  return [row["step"] for row in map(json.loads, path.read_text().splitlines()) if "train/loss" in row]


def test_proxy_sft_resume_and_export_with_the_workdir_in_a_bucket(gcs_env, tmp_path):
  run = epath.Path(WORKDIR)
  records = sft_fixtures.synthetic_records(200)
  paths.copy_file(sft_fixtures.write_corpus(tmp_path / "corpus.jsonl", records),
                  run / "collect" / "corpus.jsonl")
  runner.run(tokenizer_config.get_config(), WORKDIR)  # The tokenizer stage, in this process.
  tokenizer = load_tokenizer(run / "tokenizer" / "hf")
  tmpdir = tmp_path / "tmp"  # The stages' TMPDIR: their local copies must be removed.
  tmpdir.mkdir()
  sft_args = [f"--config={REPO}/configs/proxy_sft.py:runlocal", f"--workdir={WORKDIR}"]

  _main(tmp_path, tmpdir, *sft_args)
  sft = run / "proxy_sft"
  assert sorted(p.name for p in (sft / "checkpoints").iterdir()) == ["10", "20"]
  assert _train_steps(sft / "metrics.jsonl") == list(range(1, 21))
  assert "eval/loss" in sft_fixtures.read_metrics(sft / "metrics.jsonl")[20]
  assert [p.name.startswith("events.out.tfevents.") for p in (sft / "tensorboard").iterdir()] == [True]
  assert sorted(p.name.split("-")[0] for p in (sft / "data_cache").iterdir()) == ["heldout", "train"]
  assert json.loads((sft / "config.json").read_text())["stage"] == "proxy_sft"

  _main(tmp_path, tmpdir, f"--config={REPO}/configs/export.py", f"--workdir={WORKDIR}",
        f"--config.checkpoint={WORKDIR}/proxy_sft/checkpoints", "--config.dtype=float32")
  out = run / "export" / "hf"
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
      {p.name for p in out.iterdir()}
  # The export of step 20 is the one proxy_sft wrote after training, byte for byte.
  assert (out / "model.safetensors").read_bytes() == (sft / "hf" / "model.safetensors").read_bytes()
  # And it reads back from the bucket (load_hf, load_tokenizer) as the checkpoint's parameters.
  params, cfg = hf_io.load_hf(out)
  restored, meta = checkpoint.restore_params(sft / "checkpoints")
  assert meta["tokenizer"] == f"{WORKDIR}/tokenizer/hf" and cfg.num_params == 158_016
  jax.tree.map(np.testing.assert_array_equal, params, restored)
  exported = load_tokenizer(out)
  assert exported.get_vocab() == tokenizer.get_vocab() and exported.chat_template == tokenizer.chat_template

  # Resume from the bucket: 10 more steps; metrics.jsonl continues without repeating a step.
  log = _main(tmp_path, tmpdir, *sft_args, "--config.train.steps=30")
  assert f"resumed from {WORKDIR}/proxy_sft/checkpoints step 20" in log
  assert "packed rows from the cache gs://bucket/run/proxy_sft/data_cache/" in log
  assert sorted(p.name for p in (sft / "checkpoints").iterdir()) == ["10", "20", "30"]
  assert _train_steps(sft / "metrics.jsonl") == list(range(1, 31))
  assert len(list((sft / "tensorboard").iterdir())) == 2  # The resumed run's own event file.

  assert not (tmp_path / "gs:").exists()  # No gs:// path was taken for a local one.
  assert not list(tmpdir.iterdir())


def test_local_mirror_copies_what_changed_and_cleans_up(gcs_env):
  remote = epath.Path("gs://bucket/mirror")
  with paths.LocalMirror(remote, prefix="test-mirror-") as mirror:
    with open(os.path.join(mirror.local, "a.jsonl"), "w") as f:
      f.write("1\n")
    assert mirror.sync() == ["a.jsonl"] and mirror.sync() == []
    with open(os.path.join(mirror.local, "a.jsonl"), "a") as f:
      f.write("2\n")
    os.makedirs(os.path.join(mirror.local, "tb"))
    with open(os.path.join(mirror.local, "tb", "events"), "wb") as f:
      f.write(b"\0")
    assert sorted(mirror.sync()) == ["a.jsonl", "tb/events"]
    with open(os.path.join(mirror.local, "late.txt"), "w") as f:
      f.write("at close")
  assert not os.path.exists(mirror.local)
  assert (remote / "a.jsonl").read_text() == "1\n2\n" and (remote / "tb" / "events").read_bytes() == b"\0"
  assert (remote / "late.txt").read_text() == "at close"

  with paths.local_dir(remote, include=("*.jsonl", "tb/*")) as local:
    assert sorted(os.listdir(local)) == ["a.jsonl", "tb"] and open(os.path.join(local, "a.jsonl")).read() == "1\n2\n"
  assert not os.path.exists(local)
  with pytest.raises(FileNotFoundError, match="gs://bucket/nowhere does not exist"):
    with paths.local_dir("gs://bucket/nowhere"):
      pass


def test_a_failed_mirror_upload_keeps_the_files_and_says_where(gcs_env, monkeypatch):
  mirror = paths.LocalMirror("gs://bucket/unreachable")
  with open(os.path.join(mirror.local, "metrics.jsonl"), "w") as f:
    f.write("{}\n")
  monkeypatch.setattr(paths, "copy_file", lambda src, dst: (_ for _ in ()).throw(OSError("bucket gone")))
  with pytest.raises(OSError, match=re.escape(f"could not copy {mirror.local} to gs://bucket/unreachable "
                                              "(OSError: bucket gone); the local copy is kept")):
    mirror.close()
  assert open(os.path.join(mirror.local, "metrics.jsonl")).read() == "{}\n"
  shutil.rmtree(mirror.local)
