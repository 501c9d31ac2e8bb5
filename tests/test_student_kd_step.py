"""The student's step: online distillation on 1 device equals 8 simulated devices (fsdp x tensor),
alpha = 0 is exactly the SFT step, and the sample weights follow Eq. 9."""
import json

import numpy as np

from conftest import run_python
from proxykd.estimator import weights as sample_weights

SCRIPT = r"""
import json
import jax, numpy as np
from proxykd.data.batches import HostSlice
from proxykd.data.packing import pack
from proxykd.data.tokenize import Example
from proxykd.models import checkpoint
from proxykd.models.config import preset
from proxykd.train import distill, optimizer, sharding as shd, state as st, step as sp

student = preset("tiny", num_heads=4, num_kv_heads=2)
proxy = preset("tiny", hidden_size=96, num_heads=4, num_kv_heads=2, intermediate_size=192)
B, T, STEPS, K = 8, 64, 5, 4
rng = np.random.default_rng(0)
docs = []
for i in range(160):
  n = int(rng.integers(10, 50))
  ids = ((int(rng.integers(0, 512)) + 7 * np.arange(n)) % 512).astype(np.int32)
  docs.append(Example(ids, np.arange(n) >= n // 3, str(i), features={
      "weight": np.full(n, 0.3 + (i % 5) / 5, np.float32),
      "prior_ids": ((ids[:, None] + np.arange(K)) % 512).astype(np.int32),
      "prior_probs": np.full((n, K), 0.5 / K, np.float32),
      "prior_rest": np.full(n, 0.5 / (512 - K), np.float32)}))
rows = pack(docs, T)
batches = [{k: v[s * B:(s + 1) * B] for k, v in rows.arrays.items()} for s in range(STEPS)]
oc = optimizer.default_config()
oc.update(lr=1e-2, warmup_steps=1)
s = distill.KDSettings(alpha=10.0, kappa=2.0, m=5.0, tau=1.5, use_prior=True, chunk_len=16)

def run(shape, devices=None, alpha=None, loss=None):
  mesh = shd.make_mesh(shape, devices)
  shd.validate_mesh(mesh, {"model": student, "proxy": proxy}, B)
  tx, sched = optimizer.make_optimizer(oc, STEPS)
  ab, sh = st.abstract_state(student, tx), st.state_shardings(student, tx, mesh)
  loss = loss or distill.kd_loss(student, s, proxy)
  spec = sp.batch_spec(rows.element_spec(), B, mesh)
  frozen_spec = {distill.PROXY: st.model_spec(proxy, mesh)}
  compiled = sp.compile_step(sp.make_train_step(loss, tx, sched), ab, sh, spec, frozen_spec, mesh)
  sfor = lambda c: shd.param_shardings(c, mesh)
  state, _ = st.init_state(student, tx, mesh, 0, checkpoint.load_params({"random": 0}, student, sfor))
  frozen = {distill.PROXY: checkpoint.load_params({"random": 7}, proxy, sfor)}
  host = HostSlice(shd.batch_sharding(mesh), B)
  out = []
  for b in batches:
    state, m = compiled(state, host.assemble(b), frozen)
    out.append({k: float(v) for k, v in m.items()})
  return out

if MODE == "mesh":
  out = {"one": run({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
         "eight": run({"data": 1, "fsdp": 4, "tensor": 2})}
else:  # alpha = 0: the distillation step is exactly the SFT step.
  one = {"data": 1, "fsdp": 1, "tensor": 1}
  out = {"zero": run(one, loss=distill.kd_loss(student, distill.KDSettings(alpha=0.0, chunk_len=16), proxy)),
         "sft": run(one, loss=sp.sft_loss(student, 16))}
print("RESULT" + json.dumps(out))
"""


def _run(mode, devices):
  code = SCRIPT.replace("if MODE ==", f"MODE = {mode!r}\nif MODE ==")
  return json.loads(run_python(code, devices=devices, timeout=600).split("RESULT", 1)[1])


def test_online_distillation_on_one_device_equals_eight_fsdp_x_tensor():
  out = _run("mesh", 8)
  one, eight = out["one"], out["eight"]
  assert len(one) == 5 and one[-1]["loss"] < one[0]["loss"]
  assert one[0]["distill/kl"] > 0 and 0.3 < one[0]["distill/weight_mean"] < 1.1
  for a, b in zip(one, eight):
    for k in ("loss", "distill/nll", "distill/kl", "grad_norm"):
      assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])), (k, a[k], b[k])


def test_alpha_zero_is_exactly_the_sft_step():
  out = _run("alpha0", 1)
  for a, b in zip(out["zero"], out["sft"]):
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    assert a["distill/kl"] == 0.0


def test_sample_weights_follow_eq_9():
  logp = np.array([[-1.0, -2.0, -3.0, 0.0], [-0.5, -0.5, 0.0, 0.0]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])
  doc = np.array([[0, 0, 0, -1], [1, 1, -1, -1]])
  ids, means = sample_weights.per_record_mean_logp(logp, mask, doc, ["a", "b"])
  assert ids == ["a", "b"]
  np.testing.assert_allclose(means, [-2.0, -0.5])
  w = sample_weights.sample_weights(ids, means)
  mu, s = np.mean(means), np.std(means)
  np.testing.assert_allclose(w.weights, 1 / (1 + np.exp(-(means - mu) / s)))
  np.testing.assert_allclose(sample_weights.token_weights(w.by_id(), doc, ["a", "b"]),
                             [[w.weights[0]] * 3 + [0.0], [w.weights[1]] * 2 + [0.0, 0.0]],
                             rtol=1e-6)
