"""Two processes joined by jax.distributed (gloo collectives on CPU, coordinator on 127.0.0.1), each
with 2 simulated devices, run proxy_sft and then online student_kd through
launch/gpu_multihost.sh in one shared workdir, each process reading only its own rows of every
batch (proxykd/data/batches.py HostSlice); the losses, the held-out loss, the sample weights and the
exported weights equal a single process's on the same 4 devices and mesh (fsdp=2 x tensor=2, the
tensor pairs inside a process, fsdp across the two)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sft_fixtures
from conftest import REPO

MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
COMMON = [*MESH, "--config.data.seq_len=128", "--config.train.batch_size=8",
          "--config.train.steps=4", "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.save_every=4", "--config.train.progress_bar=False",
          "--config.split.heldout=0.1"]
SFT = ["--config=configs/proxy_sft.py:runlocal", *COMMON]
KD = ["--config=configs/student_kd.py:runlocal,baseline=proxykd", *COMMON, "--config.kd.tau=1",
      "--config.export=False"]
# Relative (absolute below 1): the two runs' collectives (in-process vs gloo) sum in other orders,
# so float32 results may differ in the last bits (about 2e-7 of a loss of 7 after 4 steps).
TOL = 1e-6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _start(workdir: Path, args: list[str], log: Path, devices: int, **env) -> subprocess.Popen:
  """launch/gpu_multihost.sh (one host's process: `python main.py --multihost ARGS`), or
  main.py alone when `env` has no JAX_* cluster variables."""
  command = (["bash", str(REPO / "launch" / "gpu_multihost.sh")] if env
             else [sys.executable, "main.py"])
  with open(log, "w") as out:
    return subprocess.Popen([*command, f"--workdir={workdir}", *args], cwd=REPO,
                            env=dict(_env(devices), **env), stdout=out, stderr=subprocess.STDOUT)


def _run_stage(workdirs: dict[str, Path], args: list[str], log_dir: Path) -> None:
  """The stage in one process of 4 devices and, at the same time, as two processes of 2 devices
  joined through a coordinator on 127.0.0.1, as a user would start it on two hosts."""
  stage = args[0].split("/")[-1].split(".")[0]
  port = _free_port()
  logs = [log_dir / f"{stage}-single.log", log_dir / f"{stage}-0.log", log_dir / f"{stage}-1.log"]
  procs = [_start(workdirs["single"], args, logs[0], 4)]
  for pid in range(2):
    procs.append(_start(workdirs["multi"], args, logs[1 + pid], 2,
                        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID=str(pid)))
  try:
    codes = [p.wait(timeout=400) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for code, log in zip(codes, logs):
    assert code == 0, f"{log.name} exited {code}:\n{log.read_text()[-4000:]}"


def _losses(path: Path) -> dict[int, dict]:
  rows = sft_fixtures.read_metrics(path)
  return {s: {k: v for k, v in m.items() if k in ("train/loss", "eval/loss", "distill/kl",
                                                  "distill/nll", "train/grad_norm")}
          for s, m in rows.items()}


def _assert_close(a: dict, b: dict, what: str) -> None:
  assert a.keys() == b.keys(), what
  for step in a:
    assert a[step].keys() == b[step].keys(), (what, step)
    for k, v in a[step].items():
      assert abs(v - b[step][k]) <= TOL * max(1.0, abs(v)), (what, step, k, v, b[step][k])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  records = sft_fixtures.synthetic_records(200, seed=3)
  out = {}
  for name in ("single", "multi"):
    workdir = root / name
    sft_fixtures.write_corpus(workdir / "collect" / "corpus.jsonl", records)
    sft_fixtures.demo_tokenizer(workdir / "tokenizer" / "hf", records)
    out[name] = workdir
  for args in (SFT, KD):
    _run_stage(out, args, root)
  return out


def test_sft_steps_match_a_single_process(runs):
  single = _losses(runs["single"] / "proxy_sft" / "metrics.jsonl")
  multi = _losses(runs["multi"] / "proxy_sft" / "metrics.jsonl")
  assert sorted(single) == [1, 2, 3, 4] and "eval/loss" in single[4]
  _assert_close(single, multi, "proxy_sft")
  # The export: every host gathers each tensor, process 0 writes.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  a = load_file(runs["single"] / "proxy_sft" / "hf" / "model.safetensors")
  b = load_file(runs["multi"] / "proxy_sft" / "hf" / "model.safetensors")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=TOL, err_msg=k)


def test_online_student_kd_steps_match_a_single_process(runs):
  single = _losses(runs["single"] / "student_proxykd" / "metrics.jsonl")
  multi = _losses(runs["multi"] / "student_proxykd" / "metrics.jsonl")
  assert sorted(single) == [1, 2, 3, 4] and single[1]["distill/kl"] > 0
  _assert_close(single, multi, "student_kd")
  # The sample weights: one scoring pass of the proxy, its rows gathered from both processes.
  read = lambda d: [json.loads(l) for l in (d / "student_proxykd" / "weights.jsonl").read_text().splitlines()]
  wa, wb = read(runs["single"]), read(runs["multi"])
  assert [r["id"] for r in wa] == [r["id"] for r in wb] and len(wa) > 50
  np.testing.assert_allclose([r["w"] for r in wa], [r["w"] for r in wb], atol=TOL)
