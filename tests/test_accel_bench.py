"""bench/accel.py runs on the CPU (tiny shapes) and prints the fields the device check reads."""
import json
import os
import subprocess
import sys

from conftest import REPO


def test_accel_bench_runs_quick_on_cpu():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, str(REPO / "bench" / "accel.py"), "--quick"], env=env,
                        capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  kinds = [r["kind"] for r in records]
  assert kinds[0] == "calibration" and {"train_step", "decode", "attention"} <= set(kinds)
  ran = [r for r in records if r["kind"] == "train_step" and r["status"] == "ok"]
  assert [r["row"] for r in ran] == ["tinyllama_8x2048_none"]
  for r in ran:
    assert r["tokens_per_s"] > 0 and 0 < r["mfu_vs_matmul"] and r["peak_memory_gb"] >= 0, r
    assert "causal attention counted in full" in r["flops_convention"]
  decode = next(r for r in records if r["kind"] == "decode")
  assert decode["status"] == "ok" and 0 < decode["decode_bandwidth_fraction"], decode
  assert decode["weight_bytes_per_token"] > 0 and decode["ms_per_token"] > 0
  attn = next(r for r in records if r["kind"] == "attention")
  assert attn["status"] == "ok" and attn["implementation"] == "xla"
  assert attn["max_abs_error_vs_xla"] == 0.0
