"""Accelerator benchmark: train-step throughput against this run's matmul, decode against this run's
memory bandwidth, and each attention implementation. One JSON object per line, per measurement.

- `train_step` (issue 12's table, then attempts at its targets): the SFT step (AdamW, bfloat16
  compute, float32 master weights, one document per row, one device) of
  `tinyllama_8x2048_none` / `_dots`, `llama3_8b_width_8l_4x2048_full` / `_minimal` (Llama-3-8B
  width, 8 layers, vocab 128,256), `tinyllama_2x8192_full` / `_minimal`, and last
  `llama3_8b_4x2048_full` (full depth) when its train state fits in device memory. Fields:
  `tokens_per_s`, `model_tflops_per_s` (PaLM's convention, as bench/train_step.py: 6 x matmul
  parameters, lm_head included, + 12 x layers x seq x heads x head_dim for attention, the causal
  half NOT discounted), `matmul_tflops_per_s` (the best bfloat16 8192^3 matmul of this run),
  `mfu_vs_matmul` (their ratio), `peak_memory_gb` (XLA's peak for the compiled step) and
  `device_peak_gb` (the device's peak so far, where it reports one). A row that does not fit says
  `"status": "out_of_memory"` with XLA's message; `skipped` says why it did not run.
- `decode`: batch-1 greedy decode (the KV-cache sampler; float32 master weights, read in
  bfloat16) of the 8-layer 8B-width model: `ms_per_token` from the difference of 256 and 128 new
  tokens in one compiled program (prefill and the once-per-call weight cast cancel), and
  `decode_bandwidth_fraction` = (bytes of the weights each token reads: every parameter but the
  embedding table, of which it reads one row / ms_per_token) / `copy_bandwidth_gb_per_s` (this
  run's device-to-device copy of a 2 GiB array, bytes read + written per second).
- `attention`: forward + backward of causal self-attention with packed segments at the rows'
  shapes, for every implementation this platform runs (model.attention), with its largest
  difference from XLA computing in float32 (`max_abs_error_vs_xla`, output and gradients): which
  kernel `auto` should prefer, and whether each is right on this device.

On a CPU the same measurements run at tiny shapes (`--quick`, the default there; tests run it), to
check that everything runs; the numbers mean nothing. Quick runs one of the train rows (`--rows` for
others) and skips `full8b`. On a device: `python bench/accel.py` (`--only
train,decode,attention,full8b` picks parts; `--rows`, `--remat`, `--attention` override the rows).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# JAX preallocates 75% of a GPU by default; the rows are sized against (almost) all of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402  pylint: disable=wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from proxykd.data.packing import empty_rows  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models import attention  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models.checkpoint import load_params  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models.config import PRESETS, ModelConfig  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models.sampling import Sampler  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.models.transformer import init_params  # noqa: E402  pylint: disable=wrong-import-position
from proxykd.train import optimizer, sharding as shd, state as st, step as sp  # noqa: E402  pylint: disable=wrong-import-position
from train_step import model_flops_per_token  # noqa: E402  pylint: disable=wrong-import-position

GB = 1e9
FLOPS_CONVENTION = ("PaLM: 6 x matmul params (lm_head included) + 12 x layers x seq x heads x "
                    "head_dim per token; causal attention counted in full, as bench/train_step.py")
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                 num_heads=32, num_kv_heads=4, max_position_embeddings=8192)
LLAMA3_8B = PRESETS["llama3_8b"]
# (name, shape, batch, seq, remat); the 8B full-depth row is `full8b`.
ROWS = [
    ("tinyllama_8x2048_none", TINYLLAMA, 8, 2048, "none"),
    ("tinyllama_8x2048_dots", TINYLLAMA, 8, 2048, "dots"),
    ("llama3_8b_width_8l_4x2048_full", {**LLAMA3_8B, "num_layers": 8}, 4, 2048, "full"),
    ("llama3_8b_width_8l_4x2048_minimal", {**LLAMA3_8B, "num_layers": 8}, 4, 2048, "minimal"),
    ("tinyllama_2x8192_full", TINYLLAMA, 2, 8192, "full"),
    ("tinyllama_2x8192_minimal", TINYLLAMA, 2, 8192, "minimal"),
]
FULL_8B = ("llama3_8b_4x2048_full", LLAMA3_8B, 4, 2048, "full")
DECODE_MODEL = ("llama3_8b_width_8l", {**LLAMA3_8B, "num_layers": 8})
# Attention shapes (batch, length, heads, kv heads, head_dim): the TinyLlama and 8B-width rows.
ATTENTION_SHAPES = [("tinyllama_2x8192", 2, 8192, 32, 4, 64), ("llama3_8b_4x2048", 4, 2048, 32, 8, 128)]
# --quick: every shape shrunk to something a CPU runs in seconds.
QUICK_SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=1024)
QUICK_ATTENTION = [("quick", 2, 128, 4, 2, 16)]
QUICK_ROWS = ("tinyllama_8x2048_none",)  # Every row is the same tiny model: one compile checks it.


def emit(record: dict) -> None:
  print(json.dumps({"bench": "accel", **record}), flush=True)


def device_summary() -> dict:
  d = jax.devices()[0]
  return {"platform": attention.platform(), "device": d.device_kind, "devices": jax.device_count()}


def memory_limit() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return stats.get("bytes_limit") if stats else None


def device_peak_gb() -> float | None:
  stats = jax.devices()[0].memory_stats()
  peak = (stats or {}).get("peak_bytes_in_use")
  return None if peak is None else round(peak / GB, 2)


def _best_seconds(fn, reps: int) -> float:
  fn()  # Warm-up (and compile).
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def matmul_flops_per_s(n: int, dtype) -> float:
  """The best of several n^3 matmuls in `dtype` (bfloat16 on a device)."""
  keys = jax.random.split(jax.random.PRNGKey(0))
  a, b = (jax.random.normal(k, (n, n), dtype) for k in keys)
  f = jax.jit(jnp.dot)
  return 2 * n ** 3 / _best_seconds(lambda: f(a, b), 10)


def copy_bytes_per_s(nbytes: int) -> float:
  """Device-to-device copy bandwidth: bytes read + written per second by x -> x + 1 (bfloat16)."""
  x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda x: x + jnp.ones((), x.dtype))
  return 2 * x.nbytes / _best_seconds(lambda: f(x), 10)


def _failure(e: Exception) -> dict:
  """`out_of_memory` (with the bytes XLA asked for, when it says) or `error`, and the message."""
  text = str(e)
  if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
    return {"status": "error", "error": f"{type(e).__name__}: {text[:300]}"}
  asks = re.search(r"allocate ([\d,]+) bytes", text)
  return {"status": "out_of_memory", "error": text.strip().splitlines()[0][:300],
          **({"asks_gb": round(int(asks.group(1).replace(",", "")) / GB, 1)} if asks else {})}


def _free() -> None:
  gc.collect()
  jax.clear_caches()


def model_config(shape: dict, remat: str, attention_impl: str, quick: bool) -> ModelConfig:
  return ModelConfig(**(QUICK_SHAPE if quick else shape), dtype="auto", param_dtype="float32",
                     remat=remat, attention=attention_impl)


def train_row(name: str, cfg: ModelConfig, batch: int, seq: int, rounds: int,
              matmul: float) -> dict:
  """One SFT step's throughput and memory (see the module docstring), or why it did not run."""
  row = {"kind": "train_step", "row": name, "remat": cfg.remat, "attention": cfg.attention,
         "batch": batch, "seq_len": seq, "layers": cfg.num_layers, "params": cfg.num_params}
  limit = memory_limit()
  state_bytes = 16 * cfg.num_params  # float32 params, two Adam moments and the gradients
  if limit and state_bytes > 0.95 * limit:
    return {**row, "status": "skipped", "reason": f"the train state alone needs "
            f"{state_bytes / GB:.0f} GB, the device has {limit / GB:.0f} GB"}
  try:
    row["attention_impl"] = attention.resolve(cfg.attention, jnp.dtype(
        jnp.float32 if attention.platform() == "cpu" else jnp.bfloat16), cfg.head_dim, seq)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tx, sched = optimizer.make_optimizer(optimizer.default_config(), 1000)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    host = empty_rows(batch, seq)
    host.update(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                segment_ids=np.ones((batch, seq), np.int32), loss_mask=np.ones((batch, seq), np.int32))
    spec = sp.batch_spec({k: (v.shape[1:], v.dtype) for k, v in host.items()}, batch, mesh)
    t = time.perf_counter()
    compiled = sp.compile_step(sp.make_train_step(sp.sft_loss(cfg, 512), tx, sched),
                               st.abstract_state(cfg, tx), st.state_shardings(cfg, tx, mesh),
                               spec, {}, mesh)
    row["compile_seconds"] = round(time.perf_counter() - t, 1)
    memory = compiled.memory_analysis()
    row["peak_memory_gb"] = round(memory.peak_memory_in_bytes / GB, 3)
    state, _ = st.init_state(cfg, tx, mesh, 0, load_params({"random": 0}, cfg))
    data = {k: jax.device_put(v, spec[k].sharding) for k, v in host.items()}
    state, metrics = compiled(state, data, {})  # Warm-up.
    jax.block_until_ready(metrics)
    steps = []
    for _ in range(rounds):
      t = time.perf_counter()
      state, metrics = compiled(state, data, {})
      jax.block_until_ready(metrics)
      steps.append(time.perf_counter() - t)
    del state, data, compiled
  except Exception as e:  # pylint: disable=broad-except  (one failing row must not end the run)
    _free()
    return {**row, **_failure(e)}
  _free()
  seconds = statistics.median(steps)
  flops = model_flops_per_token(cfg, seq) * batch * seq
  return {**row, "status": "ok", "tokens_per_s": round(batch * seq / seconds, 1),
          "step_seconds": round(seconds, 4), "model_tflops_per_s": round(flops / seconds / 1e12, 3),
          "matmul_tflops_per_s": round(matmul / 1e12, 3),
          "mfu_vs_matmul": round(flops / seconds / matmul, 4), "device_peak_gb": device_peak_gb(),
          "flops_per_token": model_flops_per_token(cfg, seq), "flops_convention": FLOPS_CONVENTION}


def decode_row(name: str, cfg: ModelConfig, new: int, copy_bw: float) -> dict:
  """Batch-1 greedy decode: time per token and the fraction of the copy bandwidth it reaches."""
  params = init_params(cfg, jax.random.PRNGKey(0))
  sampler = Sampler(cfg, min_new_tokens=new)  # One program: the token limit is a traced input.
  prompt = [list(range(3, 19))]
  run = lambda n: lambda: sampler.generate(params, prompt, max_new_tokens=n)
  short, full = _best_seconds(run(new // 2), 5), _best_seconds(run(new), 5)
  per_token = (full - short) / (new - new // 2)
  itemsize = jnp.dtype(jnp.float32 if attention.platform() == "cpu" else jnp.bfloat16).itemsize
  table = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
  weight_bytes = (cfg.num_params - table) * itemsize
  del params, sampler
  _free()
  return {"kind": "decode", "model": name, "status": "ok", "batch": 1, "new_tokens": new,
          "prompt_tokens": len(prompt[0]), "params": cfg.num_params,
          "weight_dtype": "float32" if itemsize == 4 else "bfloat16",
          "ms_per_token": round(1000 * per_token, 4), "tokens_per_s": round(1 / per_token, 1),
          "weight_bytes_per_token": weight_bytes,
          "weights_gb_per_s": round(weight_bytes / per_token / GB, 1),
          "copy_bandwidth_gb_per_s": round(copy_bw / GB, 1),
          "decode_bandwidth_fraction": round(weight_bytes / per_token / copy_bw, 4)}


def _packed_segments(batch: int, t: int) -> np.ndarray:
  """Four documents of uneven lengths per row, then a little padding."""
  cuts = np.linspace(0, t - t // 16, 5).astype(int)
  row = np.zeros(t, np.int32)
  for i in range(4):
    row[cuts[i]:cuts[i + 1]] = i + 1
  return np.tile(row, (batch, 1))


def attention_rows(name: str, b: int, t: int, h: int, kvh: int, d: int) -> list[dict]:
  """Forward + backward time of each implementation here, and its error against float32 XLA."""
  plat = attention.platform()
  names = attention.runnable_here()
  dtype = jnp.float32 if plat == "cpu" else jnp.bfloat16
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q32 = jax.random.normal(keys[0], (b, t, h, d), jnp.float32)
  k32, v32 = (jax.random.normal(k, (b, t, kvh, d), jnp.float32) for k in keys[1:3])
  w32 = jax.random.normal(keys[3], (b, t, h, d), jnp.float32)
  seg = jnp.asarray(_packed_segments(b, t))

  def program(impl):  # The output and the gradients of <output, w>: one forward, one backward.
    def run(q, k, v):
      out, vjp = jax.vjp(lambda q, k, v: attention.self_attention(impl, q, k, v, seg), q, k, v)
      return out, vjp(w32.astype(out.dtype))
    return jax.jit(run)

  reference = jax.device_get(program("xla")(q32, k32, v32))
  args = tuple(x.astype(dtype) for x in (q32, k32, v32))
  flops = 3 * 2 * b * h * t * t * d  # forward + backward (2x forward), the causal half only
  out = []
  for impl in names:
    row = {"kind": "attention", "shape": name, "implementation": impl, "batch": b, "seq_len": t,
           "heads": h, "kv_heads": kvh, "head_dim": d, "dtype": jnp.dtype(dtype).name}
    try:
      f = program(impl)
      seconds = _best_seconds(lambda: f(*args), 5)
      got = jax.device_get(f(*args))
      err = max(float(np.max(np.abs(np.asarray(g, np.float32) - r)))
                for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(reference)))
      row.update(status="ok", ms_fwd_bwd=round(1000 * seconds, 3),
                 tflops_per_s=round(flops / seconds / 1e12, 2), max_abs_error_vs_xla=err,
                 flops_convention="forward + backward = 3 x 2 x B x H x T^2 x D (causal half)")
    except Exception as e:  # pylint: disable=broad-except
      row.update(_failure(e))
    out.append(row)
    _free()
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                      help="tiny shapes (default: on a CPU)")
  parser.add_argument("--only", default="train,decode,attention,full8b",
                      help="comma-separated parts: train, decode, attention, full8b")
  parser.add_argument("--rows", default="", help="comma-separated train rows (default: all)")
  parser.add_argument("--remat", default="", help="override every train row's remat policy")
  parser.add_argument("--attention", default="auto", help="model.attention for the train rows")
  parser.add_argument("--rounds", type=int, default=0, help="timed steps per row")
  args = parser.parse_args(argv)
  quick = attention.platform() == "cpu" if args.quick is None else args.quick
  parts = set(filter(None, args.only.split(",")))
  rounds = args.rounds or (1 if quick else 5)
  n, copy_size = (256, 16 << 20) if quick else (8192, 2 << 30)
  matmul = matmul_flops_per_s(n, jnp.float32 if attention.platform() == "cpu" else jnp.bfloat16)
  copy_bw = copy_bytes_per_s(copy_size)
  emit({"kind": "calibration", **device_summary(), "quick": quick, "matmul_n": n,
        "matmul_tflops_per_s": round(matmul / 1e12, 3),
        "copy_bandwidth_gb_per_s": round(copy_bw / GB, 1), "jax": jax.__version__})

  def scaled(batch, seq):
    return (2, max(64, seq // 32)) if quick else (batch, seq)

  def train(rows):
    for name, shape, batch, seq, remat in rows:
      b, t = scaled(batch, seq)
      cfg = model_config(shape, args.remat or remat, args.attention, quick)
      emit(train_row(name, cfg, b, t, rounds, matmul))

  wanted = set(filter(None, args.rows.split(","))) or (set(QUICK_ROWS) if quick else set())
  if "train" in parts:
    train([r for r in ROWS if not wanted or r[0] in wanted])
  if "decode" in parts:
    name, shape = DECODE_MODEL
    try:
      emit(decode_row(name, model_config(shape, "none", "auto", quick), 128 if quick else 256,
                      copy_bw))
    except Exception as e:  # pylint: disable=broad-except
      _free()
      emit({"kind": "decode", "model": name, **_failure(e)})
  if "attention" in parts:
    for shape in QUICK_ATTENTION if quick else ATTENTION_SHAPES:
      for row in attention_rows(*shape):
        emit(row)
  if "full8b" in parts:
    if quick:
      emit({"kind": "train_step", "row": FULL_8B[0], "status": "skipped", "reason": "--quick"})
    else:
      train([FULL_8B])


if __name__ == "__main__":
  main()
