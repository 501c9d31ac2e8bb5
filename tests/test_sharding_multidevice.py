"""1 device vs 8 simulated CPU devices: the same losses, and checkpoints that move between meshes.

Runs in a subprocess because the device count is fixed when jax is imported.
"""
import json

from conftest import run_python

SCRIPT = r"""
import json, sys
import jax, numpy as np
from proxykd.data.packing import pack
from proxykd.data.tokenize import Example
from proxykd.models.config import preset
from proxykd.train import manager, optimizer, sharding as shd, state as st, step as sp

assert jax.device_count() == 8
cfg = preset("tiny")
B, T, STEPS = 8, 64, 5
rng = np.random.default_rng(0)
docs = []
for i in range(200):
  n = int(rng.integers(8, 50))
  mask = np.arange(n) >= int(rng.integers(1, n - 2))
  ids = (int(rng.integers(0, cfg.vocab_size)) + 7 * np.arange(n)) % cfg.vocab_size  # Learnable.
  docs.append(Example(ids.astype(np.int32), mask, str(i)))
rows = pack(docs, T)
batches = [{k: v[s * B:(s + 1) * B] for k, v in rows.items()} for s in range(STEPS)]

oc = optimizer.default_config()
oc.update(lr=1e-2, warmup_steps=1, weight_decay=0.1)

def setup(shape, grad_accum=1, devices=None):
  mesh = shd.make_mesh(shape, devices)
  shd.validate_mesh(mesh, cfg, B, grad_accum)
  tx, sched = optimizer.make_optimizer(oc, STEPS)
  ab, sh = st.abstract_state(cfg, tx), st.state_shardings(cfg, tx, mesh)
  fn = sp.make_train_step(sp.sft_loss(cfg, 16), tx, sched, grad_accum=grad_accum)
  compiled = sp.compile_step(fn, ab, sh, sp.batch_spec(B, T, mesh), mesh)
  return mesh, tx, ab, sh, compiled

def run(shape, grad_accum=1, devices=None, ckpt_dir=None, resume_from=None):
  mesh, tx, ab, sh, compiled = setup(shape, grad_accum, devices)
  first = 0
  if resume_from is not None:
    ck = manager.TrainCheckpoints(resume_from)
    state, meta, data = ck.restore(ck.latest_step(), st.with_shardings(ab, sh))
    first = data["position"]
    assert state.params["embedding"].sharding.spec == sh.params["embedding"].spec
  else:
    state = st.init_state(cfg, tx, mesh, seed=0)
  losses = []
  for s in range(first, STEPS):
    state, m = compiled(state, {k: jax.device_put(v, shd.batch_sharding(mesh))
                                for k, v in batches[s].items()})
    losses.append(float(m["loss"]))
    if ckpt_dir is not None and s + 1 == 3:
      ck = manager.TrainCheckpoints(ckpt_dir)
      ck.save(3, state, {"model": cfg.to_dict()}, {"position": 3})
      ck.close()
  return losses

out = {
    "single": run({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]),
    "data2_fsdp4": run({"data": 2, "fsdp": 4, "tensor": 1}, ckpt_dir=sys.argv[1]),
    "fsdp4_tensor2": run({"data": 1, "fsdp": 4, "tensor": 2}),
    "resumed_on_fsdp2_tensor2_data2": run({"data": 2, "fsdp": 2, "tensor": 2},
                                          resume_from=sys.argv[1]),
}
print("RESULT" + json.dumps(out))
"""


def test_one_vs_eight_devices_same_losses(tmp_path):
  script = SCRIPT.replace("sys.argv[1]", repr(str(tmp_path / "ckpt")))
  out = run_python(script, devices=8, timeout=400)
  losses = json.loads(out.split("RESULT", 1)[1])
  ref = losses["single"]
  assert len(ref) == 5 and ref[-1] < ref[0]
  for name in ("data2_fsdp4", "fsdp4_tensor2"):
    assert len(losses[name]) == 5
    for a, b in zip(losses[name], ref):
      assert abs(a - b) <= 1e-5, (name, losses[name], ref)
  # Saved on a data=2,fsdp=4 mesh after step 3, restored onto data=2,fsdp=2,tensor=2.
  resumed = losses["resumed_on_fsdp2_tensor2_data2"]
  assert len(resumed) == 2
  for a, b in zip(resumed, ref[3:]):
    assert abs(a - b) <= 1e-5, (resumed, ref)
