"""Pod layouts (configs/pods): every big-model program lowers for the layout's device count on
simulated CPU devices, and its per-device memory fits the accelerator (launch/memory.py); the
activation estimate it adds is an upper bound of XLA's own figure where XLA can compute one."""
import importlib.util
import json
import subprocess
import sys

import pytest

from configs import pods
from conftest import REPO, run_python
from proxykd.models.config import preset


@pytest.fixture(scope="module")
def memory():
  proc = subprocess.run([sys.executable, str(REPO / "launch" / "memory.py")], cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout)


def test_every_layout_lowers_each_stage_and_fits(memory):
  assert list(memory["layouts"]) == list(pods.LAYOUTS)
  print()
  for name, layout in memory["layouts"].items():
    programs = {r["program"]: r for r in layout["programs"]}
    for stage in pods.STAGES:  # each stage that holds a big model has its programs here
      assert any(p.startswith(f"{stage}/") for p in programs), (name, stage)
    for program, r in programs.items():
      print(f"{name:16s} {program:22s} inputs {sum(r['inputs'].values()):6.2f} + transient "
            f"{sum(r['transient'].values()):6.2f} = {r['total']:6.2f} GiB of {r['budget']:6.2f}")
      assert r["fits"] and r["total"] <= r["budget"], (name, program, r)
      assert r["budget"] == pytest.approx(layout["hbm_gib"] * layout["usable"] * 0.9, abs=0.01)


def test_readme_table_is_the_scripts_output(memory):
  spec = importlib.util.spec_from_file_location("launch_memory", REPO / "launch" / "memory.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  readme = module.readme_table(module.README.read_text())
  assert readme == module.markdown(memory), "launch/README.md is stale: python launch/memory.py --readme"


def test_weights_are_sharded_over_every_device(memory):
  """The exact input bytes: the 70B proxy's float32 weights split over fsdp x tensor (nothing
  replicated but the norms; the data axis holds copies), the LoRA base the same, the student's
  Adam state twice its weights."""
  for name, layout in memory["layouts"].items():
    n = layout["mesh"]["fsdp"] * layout["mesh"]["tensor"]
    rows = {r["program"]: r for r in layout["programs"]}
    proxy = preset(layout["proxy"]).num_params * 4 / 2 ** 30 / n
    assert rows["cache_proxy/proxy"]["inputs"]["frozen"] == pytest.approx(proxy, rel=0.01), name
    assert rows["proxy_sft/step"]["inputs"]["frozen"] == pytest.approx(proxy, rel=0.01), name
    kd = rows["student_kd/step"]["inputs"]
    student = preset(layout["student"]).num_params * 4 / 2 ** 30 / n
    assert kd["params"] == pytest.approx(student, rel=0.01), name
    assert kd["opt_state"] == pytest.approx(2 * student, rel=0.01), name
    assert kd["frozen"] == pytest.approx(proxy, rel=0.01), name  # the online proxy
    assert rows["proxy_sft/step"]["lora_rank"] == pods.LORA_RANK
    assert rows["proxy_sft/step"]["inputs"]["params"] < 0.05 * proxy  # only the adapters train


def test_activation_estimate_is_above_xla_cpu_at_small_sizes():
  """launch/activations.py against XLA:CPU's temp buffers for the same programs (the layouts'
  stage code on 4 devices, fsdp=2 x tensor=2, float32: XLA:CPU computes bfloat16 through float32
  copies, so only float32 programs compare), for three remat policies: above it, and within 4x."""
  out = run_python("""
    import json, sys
    sys.path.insert(0, "launch")
    import activations, programs
    from configs import cache_proxy, common, proxy_sft, student_kd
    shape = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4,
                 num_heads=8, num_kv_heads=4)
    block = lambda remat, lora: common.model_config("tiny", **shape, dtype="float32", remat=remat,
                                                    lora_rank=lora)
    cases = [(proxy_sft, "full", 8), (student_kd, "minimal", 0), (proxy_sft, "none", 8),
             (cache_proxy, "full", 0)]
    rows = []
    for module, remat, lora in cases:
      c = module.get_config("runlocal")
      c.mesh.update(data=1, fsdp=2, tensor=2)
      c.data.seq_len = 256
      if "train" in c:
        c.train.update(batch_size=8, loss_chunk=128)
        c.model = block(remat, lora)
      else:
        c.update(batch_size=8, loss_chunk=128)
      p = programs.stage_programs(c.stage, c, block(remat, 8))[0]
      temp = p.lowered.compile().memory_analysis().temp_size_in_bytes
      cfg = p.models["model"]
      if p.kind == "train":
        est = activations.train_transient(cfg, 4, 256, 2, 128, "xla", p.bytes["params"],
                                          p.models.get("proxy"))
      else:
        est = activations.forward_transient(cfg, 4, 256, 2, 128, "xla")
      rows.append([p.name, remat, temp, sum(est.values())])
    print(json.dumps(rows))
  """, devices=4, timeout=300)
  rows = json.loads(out.strip().splitlines()[-1])
  assert len(rows) == 4
  for name, remat, xla, est in rows:
    print(f"{name} remat={remat}: XLA:CPU temp {xla / 2**20:.1f} MiB, estimate {est / 2**20:.1f} MiB")
    assert xla <= est <= 4 * xla, (name, remat, xla, est)
