"""The cache_proxy stage: the proxy's top-k per response position of D_s, verified; resumable
after kill -9 without writing a shard twice; refused under another fingerprint; joined to rows."""
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import REPO, copy_stages, run_main

FLAGS = ["--config.split.heldout=0.1", "--config.progress_bar=False", "--config.rows_per_shard=2",
         "--config.k=8", "--config.verify_rows=4"]


def _cmd(workdir, *extra):
  return ["--config=configs/cache_proxy.py:runlocal", f"--workdir={workdir}", *FLAGS, *extra]


def _arrays(root):
  from proxykd.data import proxy_cache  # pylint: disable=g-import-not-at-top
  manifest = proxy_cache.read_manifest(root)
  return [proxy_cache.read_shard(root, s) for s in range(manifest["num_shards"])]


def test_cache_is_verified_resumable_refused_elsewhere_and_joins_rows(warm_workdir, tmp_path):
  straight = copy_stages(warm_workdir, tmp_path / "straight", "collect", "tokenizer", "proxy_sft")
  proc = run_main(*_cmd(straight))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = straight / "cache_proxy"
  assert '"verified_positions"' in proc.stdout and (out / "summary.json").exists()

  # kill -9 while shards are being written, then resume: finished shards are kept as they are.
  killed = copy_stages(warm_workdir, tmp_path / "killed", "collect", "tokenizer", "proxy_sft")
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  p = subprocess.Popen([sys.executable, "main.py", *_cmd(killed)], cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  cache = killed / "cache_proxy"
  deadline = time.time() + 200
  while time.time() < deadline and p.poll() is None:
    if (cache / "shard-00004" / "docs.json").exists():
      os.kill(p.pid, signal.SIGKILL)
      break
    time.sleep(0.01)
  assert p.wait() == -signal.SIGKILL, "the run ended before it could be killed"
  before = {d.name: d.stat().st_mtime_ns for d in cache.glob("shard-*") if (d / "docs.json").exists()}
  assert before and len(before) < len(list(out.glob("shard-*")))
  proc = run_main(*_cmd(killed))
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name, mtime in before.items():
    assert (cache / name).stat().st_mtime_ns == mtime, name  # not written twice
  for (docs_a, a), (docs_b, b) in zip(_arrays(out), _arrays(cache)):
    assert docs_a == docs_b
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6)

  # The same cache directory under another k: refused, naming the key.
  proc = run_main(*_cmd(straight, "--config.k=4"))
  assert proc.returncode == 2 and "k: made with 8, now 4" in proc.stderr, proc.stderr[-2000:]

  # Joined to the D_s rows by (record id, offset): every response slot gets the proxy's top-k.
  from configs import cache_proxy as cache_config  # pylint: disable=g-import-not-at-top
  from proxykd.data import proxy_cache  # pylint: disable=g-import-not-at-top
  from proxykd.models.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  from proxykd.stages import cache_proxy  # pylint: disable=g-import-not-at-top
  config = cache_config.get_config("runlocal")
  config.split.heldout = 0.1
  rows = cache_proxy.rows_for(config, straight, load_tokenizer(straight / "tokenizer" / "hf"),
                              tmp_path / "rows")
  feature = proxy_cache.CacheFeature(proxy_cache.ProxyCache(out), rows.docs)
  local = {k: v[:6] for k, v in rows.arrays.items()}
  joined = feature(local)
  mask = local["loss_mask"] > 0
  assert joined["proxy_ids"].shape == (6, rows.seq_len, 8)
  assert np.isfinite(joined["proxy_logp"][mask]).all() and not np.isfinite(joined["proxy_logp"][~mask]).any()
  assert (np.diff(joined["proxy_logp"][mask], axis=-1) <= 1e-6).all()  # sorted, most likely first
  total = np.exp(joined["proxy_logp"][mask]).sum(-1) + np.exp(joined["proxy_tail"][mask])
  np.testing.assert_allclose(total, 1.0, atol=1e-4)
