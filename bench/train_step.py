"""Benchmark of the SFT train step. Prints one JSON object.

- `mfu`: model FLOP/s of the jitted SFT step (`preset("small")`, ~25M parameters, float32, sequence
  512) divided by the float32 matmul FLOP/s measured on this machine in the same run. Model FLOPs
  per token (PaLM's convention): 6 x (matmul parameters, lm_head included, embedding lookup not)
  + 12 x layers x seq_len x heads x head_dim (attention scores and values, forward + backward).
- `fsdp8_state_bytes_fraction`: bytes of params + optimizer state on one device of an 8-device
  simulated fsdp mesh, over their bytes on one device (run in a subprocess with 8 CPU devices).

  python bench/train_step.py [--batch 8] [--seq 512] [--steps 5] [--loss_chunk 512]
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
from proxykd.models.config import preset
from proxykd.train import optimizer, sharding as shd, state as st
cfg = preset("small")
tx, _ = optimizer.make_optimizer(optimizer.default_config(), 100)
mesh = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
state = st.init_state(cfg, tx, mesh, seed=0)
tree = (state.params, state.opt_state)
full = sum(x.nbytes for x in jax.tree.leaves(tree))
print(json.dumps({"per_device": st.tree_bytes_per_device(tree), "full": full}))
"""


def matmul_flops_per_s(n: int = 2048, reps: int = 10) -> float:
  """Best-of-`reps` float32 matmul throughput (jitted jnp.dot of two n x n matrices)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def model_flops_per_token(cfg, seq_len: int) -> float:
  e, f, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  proj = e * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * e * f
  matmul_params = cfg.num_layers * proj + e * cfg.vocab_size
  return 6 * matmul_params + 12 * cfg.num_layers * seq_len * cfg.num_heads * d


def train_step_seconds(cfg, batch: int, seq: int, steps: int, loss_chunk: int) -> tuple[float, float]:
  """(best seconds per step, compile seconds) of the real jitted SFT step on one device."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from proxykd.train import optimizer, sharding as shd, state as st, step as sp  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx, sched = optimizer.make_optimizer(optimizer.default_config(), 1000)
  ab, sh = st.abstract_state(cfg, tx), st.state_shardings(cfg, tx, mesh)
  spec = sp.batch_spec(batch, seq, mesh)
  t = time.perf_counter()
  compiled = sp.compile_step(sp.make_train_step(sp.sft_loss(cfg, loss_chunk), tx, sched),
                             ab, sh, spec, mesh)
  compile_s = time.perf_counter() - t
  state = st.init_state(cfg, tx, mesh, seed=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
          "segment_ids": np.ones((batch, seq), np.int32),
          "loss_mask": np.ones((batch, seq), np.int32)}
  data = {k: jax.device_put(v, spec[k].sharding) for k, v in host.items()}
  state, m = compiled(state, data)  # Warm-up.
  jax.block_until_ready(m)
  best = float("inf")
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, data)
    jax.block_until_ready(m)
    best = min(best, time.perf_counter() - t)
  return best, compile_s


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
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--loss_chunk", type=int, default=512)
  parser.add_argument("--preset", default="small")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from proxykd.models.config import preset  # pylint: disable=g-import-not-at-top
  cfg = preset(args.preset, dtype="float32", param_dtype="float32", remat="none")
  peak_before = matmul_flops_per_s()
  step_s, compile_s = train_step_seconds(cfg, args.batch, args.seq, args.steps, args.loss_chunk)
  peak = max(peak_before, matmul_flops_per_s())  # Measured around the step: same conditions.
  flops = model_flops_per_token(cfg, args.seq) * args.batch * args.seq
  print(json.dumps({
      "mfu": round(flops / step_s / peak, 4),
      "fsdp8_state_bytes_fraction": round(fsdp8_fraction(), 4),
      "model_tflops_per_s": round(flops / step_s / 1e12, 4),
      "matmul_f32_tflops_per_s": round(peak / 1e12, 4),
      "step_seconds": round(step_s, 4),
      "tokens_per_s": round(args.batch * args.seq / step_s, 1),
      "compile_seconds": round(compile_s, 1),
      "preset": args.preset, "params": cfg.num_params, "batch": args.batch, "seq_len": args.seq,
      "loss_chunk": args.loss_chunk, "dtype": "float32", "remat": "none",
  }))


if __name__ == "__main__":
  main()
