"""Benchmark of the student's distillation loss. Prints one JSON object.

ONLINE fused loss + gradient (proxykd/losses `distill` with the estimator's posterior, as the
student_kd step runs it) against a naive implementation that materialises the full [tokens, V]
logits of student and proxy, the posterior and the KL, differentiated by JAX. Inputs: student
hidden states [1, N, E] and lm_head [E, V], proxy hidden states and lm_head, a sparse prior
(top-32 ids and probabilities plus the rest), labels, sample weights; V = 128,256, N = 4,096,
E = 2,048, float32, this CPU.

- `peak_memory_ratio`: memory attributable to the loss, fused / naive: the process's peak RSS
  during loss + gradient minus its RSS once the inputs are resident (each variant in its own
  subprocess; inputs made on the device without large temporaries).
- `speed_ratio`: naive time / fused time (median of repeats, each variant in its own process).
- `kd_step_vs_sft_step`: the online student_kd train step (small preset student, small preset
  proxy) / (the SFT step of the same student + the proxy's forward to its chunked logits), same
  batch, interleaved repeats in one process.

  python bench/kd_loss.py [--tokens 4096] [--vocab 128256] [--hidden 2048] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
K_PRIOR = 32


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return 0.0


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
  """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def _hwm_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return _peak_mb()


def loss_variant(variant: str, n: int, v: int, e: int, repeats: int) -> dict:
  """Run in a subprocess: one variant's memory and time."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from proxykd import losses  # pylint: disable=g-import-not-at-top
  from proxykd.estimator import posterior  # pylint: disable=g-import-not-at-top
  from proxykd.train.distill import KDSettings, target_fn  # pylint: disable=g-import-not-at-top

  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  # Made on the device by jitted generators: no host copies, no float64 temporaries.
  make = jax.jit(lambda k, s: 0.02 * jax.random.normal(k, s, jnp.float32), static_argnums=1)
  h, hp = make(keys[0], (1, n, e)), make(keys[1], (1, n, e))
  kernel, proxy_kernel = make(keys[2], (e, v)), make(keys[3], (e, v))
  labels = jax.random.randint(keys[4], (1, n), 0, v)
  prior_ids = (labels[..., None] + jnp.arange(K_PRIOR)) % v
  prior_probs = jnp.full((1, n, K_PRIOR), 0.5 / K_PRIOR, jnp.float32)
  prior_rest = jnp.full((1, n), 0.5 / (v - K_PRIOR), jnp.float32)
  mask = jnp.ones((1, n), jnp.float32)
  weight = jax.random.uniform(keys[5], (1, n), jnp.float32, 0.2, 1.0)
  inputs = (h, kernel, hp, proxy_kernel, labels, prior_ids, prior_probs, prior_rest, mask, weight)
  jax.block_until_ready(inputs)
  s = KDSettings(alpha=100.0, kappa=4.0, m=2.0, tau=1.0, use_prior=True, chunk_len=256)

  if variant == "fused":
    soft = target_fn(s, v)

    def loss(h, kernel, hp, proxy_kernel, labels, prior_ids, prior_probs, prior_rest, mask, weight):
      per_position = {"labels": labels, "proxy_hidden": hp, "prior_ids": prior_ids,
                      "prior_probs": prior_probs, "prior_rest": prior_rest}
      return losses.distill(h, kernel, labels, mask, weight=weight, per_position=per_position,
                            shared={"proxy_kernel": proxy_kernel}, target_fn=soft, alpha=s.alpha,
                            chunk_len=s.chunk_len)[0]
  else:
    def loss(h, kernel, hp, proxy_kernel, labels, prior_ids, prior_probs, prior_rest, mask, weight):
      logq = jax.nn.log_softmax(h @ kernel)
      prior = posterior.Prior(prior_ids, prior_probs, prior_rest)
      log_p = posterior.posterior_logprobs(hp @ proxy_kernel, prior, labels, s.kappa, s.m, s.tau)
      nll = -jnp.take_along_axis(logq, labels[..., None], -1)[..., 0]
      kl = losses.forward_kl(log_p, logq, mask)
      return jnp.sum(nll * mask) + s.alpha * jnp.sum(kl * weight)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  compiled = grad.lower(*inputs).compile()
  base = _rss_mb()
  _reset_peak()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    times.append(time.perf_counter() - t)
  return {"peak_mb": _hwm_mb() - base, "seconds": statistics.median(times), "resident_mb": base}


def kd_step_vs_sft_step(repeats: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from proxykd.data.packing import empty_rows  # pylint: disable=g-import-not-at-top
  from proxykd.models import checkpoint  # pylint: disable=g-import-not-at-top
  from proxykd.models.config import preset  # pylint: disable=g-import-not-at-top
  from proxykd.train import distill, optimizer, scoring, sharding as shd, state as st, step as sp  # pylint: disable=g-import-not-at-top

  cfg = preset("small", dtype="float32")
  b, t = 8, 512
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  rows = empty_rows(b, t)
  rows.update(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
              segment_ids=np.ones((b, t), np.int32), loss_mask=np.ones((b, t), np.int32))
  rows["weight"] = np.full((b, t), 0.7, np.float32)
  spec = sp.batch_spec({k: (v.shape[1:], v.dtype) for k, v in rows.items()}, b, mesh)
  batch = {k: jax.device_put(v, spec[k].sharding) for k, v in rows.items()}
  tx, sched = optimizer.make_optimizer(optimizer.default_config(), 100)
  ab, sh = st.abstract_state(cfg, tx), st.state_shardings(cfg, tx, mesh)
  proxy = {distill.PROXY: checkpoint.load_params({"random": 1}, cfg)}
  frozen_spec = {distill.PROXY: st.model_spec(cfg, mesh)}
  s = distill.KDSettings(alpha=100.0, kappa=0.0, m=4.0, tau=1.0, chunk_len=256)
  kd = sp.compile_step(sp.make_train_step(distill.kd_loss(cfg, s, cfg), tx, sched), ab, sh, spec,
                       frozen_spec, mesh)
  sft = sp.compile_step(sp.make_train_step(sp.sft_loss(cfg, 256), tx, sched), ab, sh, spec, {}, mesh)
  from proxykd.data.packing import Rows  # pylint: disable=g-import-not-at-top
  fwd = scoring.Scorer(cfg, mesh, b, t, 256)
  packed = Rows(rows, [])
  state_kd, _ = st.init_state(cfg, tx, mesh, 0, checkpoint.load_params({"random": 0}, cfg))
  state_sft, _ = st.init_state(cfg, tx, mesh, 0, checkpoint.load_params({"random": 0}, cfg))
  state_kd, m = kd(state_kd, batch, proxy)
  state_sft, m2 = sft(state_sft, batch, {})
  jax.block_until_ready((m, m2))
  fwd(proxy[distill.PROXY], packed)
  times = {"kd": [], "sft": [], "proxy_forward": []}
  for _ in range(repeats):
    t0 = time.perf_counter()
    state_kd, m = kd(state_kd, batch, proxy)
    jax.block_until_ready(m)
    times["kd"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    state_sft, m = sft(state_sft, batch, {})
    jax.block_until_ready(m)
    times["sft"].append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    fwd(proxy[distill.PROXY], packed)
    times["proxy_forward"].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  return {"kd_step_vs_sft_step": round(med["kd"] / (med["sft"] + med["proxy_forward"]), 3),
          "kd_step_seconds": round(med["kd"], 3), "sft_step_seconds": round(med["sft"], 3),
          "proxy_forward_seconds": round(med["proxy_forward"], 3)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--vocab", type=int, default=128256)
  ap.add_argument("--hidden", type=int, default=2048)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--variant", default="")  # internal: run one loss variant
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.variant:
    print(json.dumps(loss_variant(args.variant, args.tokens, args.vocab, args.hidden, args.repeats)))
    return
  out = {}
  for variant in ("fused", "naive"):
    proc = subprocess.run([sys.executable, __file__, f"--variant={variant}", f"--tokens={args.tokens}",
                           f"--vocab={args.vocab}", f"--hidden={args.hidden}",
                           f"--repeats={args.repeats}"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    if proc.returncode:
      raise SystemExit(f"{variant}: {proc.stderr[-3000:]}")
    out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
  step = kd_step_vs_sft_step(max(args.repeats, 3))
  print(json.dumps({
      "peak_memory_ratio": round(out["fused"]["peak_mb"] / out["naive"]["peak_mb"], 4),
      "speed_ratio": round(out["naive"]["seconds"] / out["fused"]["seconds"], 3),
      **step,
      "fused_loss_mb": round(out["fused"]["peak_mb"], 1), "naive_loss_mb": round(out["naive"]["peak_mb"], 1),
      "fused_seconds": round(out["fused"]["seconds"], 3), "naive_seconds": round(out["naive"]["seconds"], 3),
      "inputs_resident_mb": round(out["fused"]["resident_mb"], 1),
      "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "dtype": "float32",
      "prior_k": K_PRIOR, "repeats": args.repeats}))


if __name__ == "__main__":
  main()
