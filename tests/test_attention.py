"""Every attention implementation equals the XLA reference: values and gradients, float32, with
packed segments, GQA, causal blocks and the KV cache. The Pallas kernels run in interpret mode;
cuDNN cannot run on a CPU, so its call is checked through JAX's XLA path with identical arguments
(everything but the kernel itself)."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from proxykd.models import attention
from proxykd.models.config import ModelConfig, preset, to_hf_config
from proxykd.models.transformer import Transformer, init_params

B, H, KVH, D = 2, 4, 2, 16  # GQA: two query heads per kv head.


def _segments(t: int) -> np.ndarray:
  """Row 0: three packed documents then padding (segment 0); row 1: one document."""
  a, b = t // 3, t // 4
  row0 = np.r_[np.full(a, 1), np.full(b, 2), np.full(t - a - b - 7, 3), np.zeros(7)]
  return np.stack([row0, np.ones(t)]).astype(np.int32)


def _qkv(t: int, s: int | None = None, seed: int = 0):
  rng = np.random.default_rng(seed)
  s = s or t
  return (jnp.asarray(rng.normal(size=(B, t, H, D)), jnp.float32),
          jnp.asarray(rng.normal(size=(B, s, KVH, D)), jnp.float32),
          jnp.asarray(rng.normal(size=(B, s, KVH, D)), jnp.float32))


def _value_and_grads(fn, q, k, v):
  """fn(q, k, v) and the gradients of a fixed random projection of it."""
  w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
  out = jax.jit(fn)(q, k, v)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)
  return out, grads


def _assert_close(got, want, atol=1e-5):
  out, grads = got
  ref_out, ref_grads = want
  np.testing.assert_allclose(out, ref_out, atol=atol, rtol=0)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=atol, rtol=0)


def _full_mask_reference(q, k, v, seg):
  """One unblocked masked softmax over all keys: what the causal blocks must reproduce."""
  return attention.xla_attention(q, k, v, jnp.arange(q.shape[1]), seg, seg)


def test_causal_blocks_equal_one_full_masked_softmax():
  t = 256
  assert attention.causal_blocks(t) == 2
  q, k, v = _qkv(t)
  seg = jnp.asarray(_segments(t))
  _assert_close(_value_and_grads(lambda *a: attention.xla_self_attention(*a, seg), q, k, v),
                _value_and_grads(lambda *a: _full_mask_reference(*a, seg), q, k, v))


@pytest.mark.parametrize("name,t", [("pallas_gpu", 64), ("splash", 128)])
def test_pallas_kernels_equal_the_reference(name, t):
  q, k, v = _qkv(t)
  seg = jnp.asarray(_segments(t))
  with attention.pallas_interpret():
    assert attention.resolve(name, jnp.float32, D, t) == name
    got = _value_and_grads(lambda *a: attention.self_attention(name, *a, seg), q, k, v)
  _assert_close(got, _value_and_grads(lambda *a: attention.xla_self_attention(*a, seg), q, k, v))


def test_cudnn_call_equals_the_reference_self_attention_and_cache():
  """The exact cuDNN call (mask, is_causal, GQA layout, scale) through JAX's XLA path."""
  t = 64
  q, k, v = _qkv(t)
  seg = jnp.asarray(_segments(t))
  cudnn_self = lambda q, k, v: attention.cudnn_attention(
      q, k, v, jnp.arange(t), seg, seg, is_causal=True, implementation="xla")
  _assert_close(_value_and_grads(cudnn_self, q, k, v),
                _value_and_grads(lambda *a: attention.xla_self_attention(*a, seg), q, k, v))
  # A prefill of 8 queries at slots 4..11 of a 32-slot cache: slots 0..3 hold an earlier part of
  # row 0's document, row 1 starts at slot 4; slots past the queries are empty (segment 0).
  s, first, n = 32, 4, 8
  q, k, v = _qkv(n, s, seed=1)
  q_index = first + jnp.arange(n)
  q_seg = jnp.ones((B, n), jnp.int32)
  kv_seg = jnp.asarray(np.stack([np.r_[np.ones(first + n), np.zeros(s - first - n)],
                                 np.r_[np.zeros(first), np.ones(n), np.zeros(s - first - n)]]),
                       jnp.int32)
  cudnn_cached = lambda q, k, v: attention.cudnn_attention(
      q, k, v, q_index, q_seg, kv_seg, is_causal=False, implementation="xla")
  reference = lambda q, k, v: attention.xla_attention(q, k, v, q_index, q_seg, kv_seg)
  _assert_close(_value_and_grads(cudnn_cached, q, k, v), _value_and_grads(reference, q, k, v))
  heads_major = lambda c: jnp.swapaxes(c, 1, 2)  # The KV cache's layout [B, KVH, S, D].
  with attention.pallas_interpret():  # The Pallas kernels' cached path is the reference itself.
    for name in ("pallas_gpu", "splash", "auto", "cudnn"):
      np.testing.assert_allclose(
          attention.cached_attention(name, q, heads_major(k), heads_major(v), q_index, q_seg,
                                     kv_seg), reference(q, k, v), rtol=1e-6, atol=1e-6)


def test_the_cudnn_probe_compiles_or_says_no():
  """`auto` probes while the model is being traced: the probe compiles on its own."""
  probe = lambda x: x + attention.cudnn_takes_masked_backward("float32", D, implementation="xla")
  assert jax.jit(probe)(jnp.zeros(())) == 1
  assert not attention.cudnn_takes_masked_backward("float32", D, implementation="no_such_kernel")


def _packed_batch(cfg: ModelConfig, t: int):
  seg = _segments(t)
  positions = np.zeros_like(seg)
  for row in range(seg.shape[0]):
    for i in range(1, t):
      positions[row, i] = positions[row, i - 1] + 1 if seg[row, i] == seg[row, i - 1] else 0
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, seg.shape).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(seg)


@pytest.mark.parametrize("name,t", [("pallas_gpu", 32), ("splash", 128)])
def test_the_model_with_each_kernel_equals_xla(name, t):
  """The whole decoder (packed rows, GQA) with a Pallas kernel: logits and parameter gradients."""
  cfg = preset("tiny", attention="xla")
  params = init_params(cfg, jax.random.PRNGKey(0))
  tokens, positions, seg = _packed_batch(cfg, t)

  def run(c):  # One compile for the logits and the gradients.
    logits = lambda p: Transformer(c).apply({"params": p}, tokens, positions, seg)
    return jax.jit(lambda p: (logits(p), jax.grad(lambda p: jnp.mean(logits(p) ** 2))(p)))(params)

  with attention.pallas_interpret():
    logits, grads = run(cfg.replace(attention=name))
  ref_logits, ref_grads = run(cfg)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-5, rtol=0), grads, ref_grads)


def test_resolution_rules(caplog, monkeypatch):
  monkeypatch.setattr(attention, "_logged", set())  # Each message is logged once per process.
  assert attention.platform() == "cpu"
  assert attention.resolve("auto", jnp.float32, D, 128) == "xla"
  with caplog.at_level(logging.WARNING):  # A GPU/TPU config runs here, on xla, with a warning.
    assert attention.resolve("cudnn", jnp.bfloat16, D, 128) == "xla"
    assert attention.resolve("splash", jnp.float32, D, 128) == "xla"
  assert "model.attention=cudnn does not run on cpu" in caplog.text
  with attention.pallas_interpret():
    assert attention.resolve("splash", jnp.float32, D, 256) == "splash"
    assert attention.resolve("splash", jnp.float32, D, 256, cached=True) == "xla"
    with pytest.raises(ValueError, match=r"model.attention=splash: .*multiple of 128, not 100"):
      attention.resolve("splash", jnp.float32, D, 100)
    with pytest.raises(ValueError, match=r"model.attention=pallas_gpu: .*multiple of 16, not 40"):
      attention.resolve("pallas_gpu", jnp.float32, D, 40)
  with pytest.raises(ValueError, match="model.attention must be one of"):
    attention.resolve("flash", jnp.float32, D, 128)


def test_config_field_is_validated_and_never_exported():
  cfg = preset("tiny", attention="splash")
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  assert "attention" not in to_hf_config(cfg) and "remat" not in to_hf_config(cfg)
  with pytest.raises(ValueError, match=r"model.attention must be one of auto\|xla\|cudnn"):
    preset("tiny", attention="flash")


MESH = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from proxykd.models import attention
from proxykd.models.config import preset
from proxykd.models.transformer import Transformer, init_params
from proxykd.train import sharding as shd
cfg = preset("tiny", attention="xla")
params = init_params(cfg, jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 64)), jnp.int32)
seg = jnp.asarray(np.repeat([[1] * 20 + [2] * 30 + [0] * 14], 4, axis=0), jnp.int32)
pos = jnp.asarray(np.repeat([list(range(20)) + list(range(30)) + list(range(14))], 4, axis=0), jnp.int32)
loss = lambda c: (lambda p: jnp.mean(Transformer(c).apply({"params": p}, tokens, pos, seg) ** 2))
ref = jax.jit(jax.value_and_grad(loss(cfg)))(params)
mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
sharded = jax.device_put(params, shd.param_shardings(cfg, mesh))
with attention.pallas_interpret(), shd.mesh_context(mesh):
  fn = jax.jit(jax.value_and_grad(loss(cfg.replace(attention="pallas_gpu"))))
  hlo = fn.lower(sharded).as_text()
  got = fn(sharded)
diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
# The cached prefill's per-device call (cuDNN's, through JAX's XLA path): rows of two lengths
# split over the batch axes, the query slots shared.
q, k, v = (jnp.asarray(rng.normal(size=(4, t, h, 16)), jnp.float32)
           for t, h in ((8, 4), (32, 2), (32, 2)))
q_index, q_seg = 4 + jnp.arange(8), jnp.ones((4, 8), jnp.int32)
kv_seg = jnp.asarray(np.repeat([[1] * 12 + [0] * 20], 4, axis=0), jnp.int32)
kernel = lambda q, k, v, qs, ks, qi: attention.cudnn_attention(q, k, v, qi, qs, ks, is_causal=False,
                                                               implementation="xla")
with shd.mesh_context(mesh):
  cached = jax.jit(lambda *a: attention._on_mesh(kernel, *a[:3], rows=a[3:5], shared=a[5:]))(
      q, k, v, q_seg, kv_seg, q_index)
cached_diff = float(np.abs(cached - attention.xla_attention(q, k, v, q_index, q_seg, kv_seg)).max())
print("RESULT" + json.dumps({"diff": diff, "cached_diff": cached_diff,
                             "shard_map": "shard_map" in hlo or "sdy.manual_computation" in hlo}))
"""


def test_kernels_run_per_device_on_a_mesh():
  """On a data x fsdp x tensor mesh the kernels run under shard_map (rows and heads split): the
  model's loss and gradients, and a cached prefill, equal one device's XLA attention."""
  out = json.loads(run_python(MESH, devices=8).split("RESULT", 1)[1])
  assert out["shard_map"]
  assert out["diff"] < 1e-5 and out["cached_diff"] < 1e-5
