"""Benchmark of the SFT train step. Prints one JSON object.

- `mfu`: model FLOP/s of the jitted SFT step (`preset("small")`, ~25M parameters, float32, sequence
  512) divided by the float32 matmul FLOP/s measured on this machine in the same run. The machine
  may be shared, so each round times one step between two matmul measurements (mean of several
  2048^3 matmuls each) and `mfu` is the median over rounds of step FLOP/s / matmul FLOP/s.
  `mfu_best` divides the fastest step by the fastest matmul instead. Model FLOPs
  per token (PaLM's convention): 6 x (matmul parameters, lm_head included, embedding lookup not)
  + 12 x layers x seq_len x heads x head_dim (attention scores and values, forward + backward).
- `fsdp8_state_bytes_fraction`: bytes of params + optimizer state on one device of an 8-device
  simulated fsdp mesh, over their bytes on one device (run in a subprocess with 8 CPU devices).

  python bench/train_step.py [--batch 8] [--seq 512] [--rounds 5] [--loss_chunk 512]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FSDP8 = r"""
import json, jax
from proxykd.models.checkpoint import load_params
from proxykd.models.config import preset
from proxykd.train import optimizer, sharding as shd, state as st
cfg = preset("small")
tx, _ = optimizer.make_optimizer(optimizer.default_config(), 100)
mesh = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
params = load_params({"random": 0}, cfg, lambda c: shd.param_shardings(c, mesh))
state, _ = st.init_state(cfg, tx, mesh, 0, params)
tree = (state.params, state.opt_state)
full = sum(x.nbytes for x in jax.tree.leaves(tree))
print(json.dumps({"per_device": st.tree_bytes_per_device(tree), "full": full}))
"""


class Matmul:
  """float32 matmul throughput: jitted jnp.dot of two n x n matrices."""

  def __init__(self, n: int = 2048):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.n = n
    self.a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    self.b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    self.f = jax.jit(jnp.dot)
    self.f(self.a, self.b).block_until_ready()
    self.best = 0.0

  def flops_per_s(self, reps: int = 8) -> float:
    """Mean throughput over `reps` matmuls (and the best single one is remembered)."""
    total = 0.0
    for _ in range(reps):
      t = time.perf_counter()
      self.f(self.a, self.b).block_until_ready()
      dt = time.perf_counter() - t
      total += dt
      self.best = max(self.best, 2 * self.n**3 / dt)
    return reps * 2 * self.n**3 / total


def model_flops_per_token(cfg, seq_len: int) -> float:
  e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  proj = e * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * e * f
  matmul_params = cfg.num_layers * proj + e * cfg.vocab_size
  return 6 * matmul_params + 12 * cfg.num_layers * seq_len * cfg.num_heads * d


def measure(cfg, batch: int, seq: int, rounds: int, loss_chunk: int) -> dict:
  """Rounds of (matmul, one real jitted SFT step on one device, matmul)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from proxykd.data.packing import empty_rows  # pylint: disable=g-import-not-at-top
  from proxykd.models.checkpoint import load_params  # pylint: disable=g-import-not-at-top
  from proxykd.train import optimizer, sharding as shd, state as st, step as sp  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx, sched = optimizer.make_optimizer(optimizer.default_config(), 1000)
  ab, sh = st.abstract_state(cfg, tx), st.state_shardings(cfg, tx, mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  host = empty_rows(batch, seq)  # One document per row, every target trained.
  host.update(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
              segment_ids=np.ones((batch, seq), np.int32), loss_mask=np.ones((batch, seq), np.int32))
  spec = sp.batch_spec({k: (v.shape[1:], v.dtype) for k, v in host.items()}, batch, mesh)
  t = time.perf_counter()
  compiled = sp.compile_step(sp.make_train_step(sp.sft_loss(cfg, loss_chunk), tx, sched),
                             ab, sh, spec, {}, mesh)
  compile_s = time.perf_counter() - t
  state, _ = st.init_state(cfg, tx, mesh, 0, load_params({"random": 0}, cfg))
  data = {k: jax.device_put(v, spec[k].sharding) for k, v in host.items()}
  state, m = compiled(state, data, {})  # Warm-up.
  jax.block_until_ready(m)
  matmul = Matmul()
  flops = model_flops_per_token(cfg, seq) * batch * seq
  ratios, steps = [], []
  for _ in range(rounds):
    before = matmul.flops_per_s()
    t = time.perf_counter()
    state, m = compiled(state, data, {})
    jax.block_until_ready(m)
    steps.append(time.perf_counter() - t)
    after = matmul.flops_per_s()
    ratios.append(flops / steps[-1] / ((before + after) / 2))
  return {"mfu": float(np.median(ratios)), "mfu_best": flops / min(steps) / matmul.best,
          "step_seconds": float(np.median(steps)), "best_step_seconds": min(steps),
          "model_flops_per_step": flops, "matmul_best_flops_per_s": matmul.best,
          "compile_seconds": compile_s}


def fsdp8_fraction() -> float:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  out = subprocess.run([sys.executable, "-c", FSDP8], env=env, capture_output=True, text=True,
                       check=True).stdout
  sizes = json.loads(out.strip().splitlines()[-1])
  return sizes["per_device"] / sizes["full"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--loss_chunk", type=int, default=512)
  parser.add_argument("--preset", default="small")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from proxykd.models.config import preset  # pylint: disable=g-import-not-at-top
  cfg = preset(args.preset, dtype="float32", param_dtype="float32", remat="none")
  r = measure(cfg, args.batch, args.seq, args.rounds, args.loss_chunk)
  print(json.dumps({
      "mfu": round(r["mfu"], 4),
      "fsdp8_state_bytes_fraction": round(fsdp8_fraction(), 4),
      "mfu_best": round(r["mfu_best"], 4),
      "step_seconds": round(r["step_seconds"], 3),
      "best_step_seconds": round(r["best_step_seconds"], 3),
      "tokens_per_s": round(args.batch * args.seq / r["step_seconds"], 1),
      "model_gflop_per_step": round(r["model_flops_per_step"] / 1e9, 1),
      "matmul_f32_best_gflops": round(r["matmul_best_flops_per_s"] / 1e9, 1),
      "compile_seconds": round(r["compile_seconds"], 1),
      "preset": args.preset, "params": cfg.num_params, "batch": args.batch, "seq_len": args.seq,
      "loss_chunk": args.loss_chunk, "rounds": args.rounds, "dtype": "float32", "remat": "none",
  }))


if __name__ == "__main__":
  main()
