"""The optimizer and the pure SFT step on one device: schedules, masks, accumulation, LoRA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proxykd.data.packing import pack
from proxykd.data.tokenize import Example
from proxykd.models import checkpoint, lora
from proxykd.models.config import preset
from proxykd.train import optimizer, sharding as shd, state as st, step as sp

B, T = 4, 32


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  docs = []
  for i in range(40):
    n = int(rng.integers(6, 30))
    ids = (int(rng.integers(0, 512)) + 5 * np.arange(n)) % 512
    docs.append(Example(ids.astype(np.int32), np.arange(n) >= n // 3, str(i)))
  rows = pack(docs, T)
  return {k: v[:B] for k, v in rows.arrays.items()}, rows.element_spec()


def _run(cfg, oc, steps=3, grad_accum=1):
  """-> (initial full params, final state, the frozen inputs, per-step metrics)."""
  mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx, sched = optimizer.make_optimizer(oc, 10)
  ab, sh = st.abstract_state(cfg, tx), st.state_shardings(cfg, tx, mesh)
  fn = sp.make_train_step(sp.sft_loss(cfg, 8), tx, sched, grad_accum=grad_accum)
  spec = sp.batch_spec(_batch()[1], B, mesh)
  compiled = sp.compile_step(fn, ab, sh, spec, st.base_spec(cfg, mesh), mesh)
  params = checkpoint.load_params({"random": 0}, cfg, lambda c: shd.param_shardings(c, mesh))
  init = jax.tree.map(np.array, params)
  state, frozen = st.init_state(cfg, tx, mesh, 0, params)
  out = []
  for s in range(steps):
    state, m = compiled(state, _batch(s)[0], frozen)
    out.append(jax.device_get(m))
  return init, state, frozen, out


def test_schedules():
  oc = optimizer.default_config()
  oc.update(lr=1.0, warmup_steps=10, end_lr_ratio=0.1)
  cos = optimizer.make_schedule(oc, 110)
  np.testing.assert_allclose([cos(0), cos(5), cos(10), cos(60), cos(110)],
                             [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  oc.schedule = "constant"
  const = optimizer.make_schedule(oc, 110)
  np.testing.assert_allclose([const(0), const(5), const(10), const(100)], [0, 0.5, 1, 1], atol=1e-6)
  oc.update(warmup_steps=0)
  assert float(optimizer.make_schedule(oc, 5)(3)) == 1.0
  oc.schedule = "linear"
  with pytest.raises(ValueError, match="config.optim.schedule='linear'"):
    optimizer.make_schedule(oc, 10)


def test_weight_decay_mask():
  params = {"embedding": 0, "final_norm": {"scale": 0}, "lm_head": 0,
            "layers": {"attn": {"q": {"kernel": 0, "bias": 0, "lora_a": 0}}}}
  mask = optimizer.decay_mask(params)
  assert mask == {"embedding": False, "final_norm": {"scale": False}, "lm_head": True,
                  "layers": {"attn": {"q": {"kernel": True, "bias": False, "lora_a": True}}}}
  assert optimizer.decay_mask(params, decay_embedding=True)["embedding"]


def test_step_metrics_and_grad_accumulation_equivalence():
  cfg = preset("tiny")
  oc = optimizer.default_config()
  oc.update(lr=1e-2, warmup_steps=0, schedule="constant", clip_norm=0.5, weight_decay=0.1)
  _, s1, _, m1 = _run(cfg, oc)
  _, s2, _, m2 = _run(cfg, oc, grad_accum=2)
  batch = _batch(0)[0]
  assert m1[0]["tokens"] == batch["loss_mask"].sum()
  assert m1[0]["batch_tokens"] == (batch["segment_ids"] > 0).sum()
  assert float(m1[0]["lr"]) == pytest.approx(1e-2)
  assert m1[-1]["loss"] < m1[0]["loss"]
  assert int(s1.step) == 3
  for a, b in zip(m1, m2):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
    # The loss's metrics are summed over both micro-batches, not taken from the last one.
    np.testing.assert_allclose(b["sft/nll"], a["sft/nll"], rtol=1e-6)
    np.testing.assert_allclose(a["sft/nll"], a["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, atol=1e-4)  # Adam magnifies float noise of ~0 gradients.


def test_lora_state_holds_only_adapters_and_the_base_is_a_frozen_input():
  cfg = preset("tiny", lora_rank=4, lora_alpha=8.0, lora_targets=("q", "v", "up"))
  oc = optimizer.default_config()
  oc.update(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.1)
  init, state, frozen, metrics = _run(cfg, oc)
  assert metrics[-1]["loss"] < metrics[0]["loss"]
  # The state (and so the optimizer state and the checkpoint) holds the 6 adapters, nothing else.
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
  assert len(paths) == 6 and all("lora_" in p for p in paths), paths
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
  assert sum(x.nbytes for x in jax.tree.leaves(state.opt_state)) <= 2 * adapter_bytes + 64
  init_adapters, init_base = lora.split(init, cfg)
  for a, b in zip(jax.tree.leaves(init_adapters), jax.tree.leaves(state.params)):
    assert not np.array_equal(a, np.asarray(b))  # Every adapter moved ...
  for a, b in zip(jax.tree.leaves(init_base), jax.tree.leaves(frozen[lora.BASE])):
    np.testing.assert_array_equal(a, np.asarray(b))  # ... the base did not.
  full = lora.combine(state.params, frozen[lora.BASE])
  merged, plain = lora.merge(full, cfg)
  assert plain.lora_rank == 0 and "lora_a" not in merged["layers"]["attn"]["q"]
  from proxykd.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  tokens = _batch(0)[0]["inputs"]
  with_adapters = Transformer(cfg).apply({"params": full}, tokens)
  np.testing.assert_allclose(Transformer(plain).apply({"params": merged}, tokens), with_adapters,
                             atol=1e-4)


def test_bfloat16_compute_keeps_float32_master_params():
  cfg = preset("tiny", dtype="bfloat16", param_dtype="float32")
  oc = optimizer.default_config()
  oc.update(lr=1e-2, warmup_steps=0, schedule="constant")
  _, state, _, metrics = _run(cfg, oc, steps=2)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))
  assert all(np.isfinite(m["loss"]) for m in metrics) and metrics[1]["loss"] < metrics[0]["loss"]
