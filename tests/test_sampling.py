"""The sampler for training-time generation: traced sampling parameters (no recompiles), stop
sequences on the device, greedy tokens equal to transformers' `generate`, and on a device mesh."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from proxykd.models import hf_io
from proxykd.models.config import preset
from proxykd.models.sampling import Sampler, bucket, filter_logits
from proxykd.models.transformer import init_params

CFG = preset("tiny")


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(4))


def test_filters_keep_the_top_k_and_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  keep = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, **kw)))[0].tolist()
  one = dict(temperature=jnp.float32(1.0))
  assert keep(top_p=jnp.float32(1.0), top_k=jnp.int32(0), **one) == [True] * 5
  assert keep(top_p=jnp.float32(1.0), top_k=jnp.int32(2), **one) == [True, True, False, False, False]
  # Nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third (0.15) is needed too; the rest is cut.
  assert keep(top_p=jnp.float32(0.8), top_k=jnp.int32(0), **one) == [True, True, True, False, False]
  assert keep(top_p=jnp.float32(0.3), top_k=jnp.int32(0), **one) == [True, False, False, False, False]
  assert bucket(1, 16) == 16 and bucket(17, 16) == 32 and bucket(64, 16) == 64


def test_sampling_parameters_are_traced_and_stop_sequences_end_rows(params):
  sampler = Sampler(CFG)
  prompts = [[5, 6, 7], [9, 10, 11, 12]]
  greedy = sampler.generate(params, prompts, max_new_tokens=12)
  assert sampler.compiles == 1
  for temperature, top_p, top_k, seed in ((1.0, 0.9, 0, 1), (0.7, 1.0, 5, 2), (1.3, 0.5, 3, 3)):
    sampler.generate(params, prompts, max_new_tokens=12, temperature=temperature, top_p=top_p,
                     top_k=top_k, seed=seed)
  sampler.generate(params, prompts, max_new_tokens=9)  # Same bucket (16), a lower limit.
  assert sampler.compiles == 1  # None of these recompiled.
  top1 = sampler.generate(params, prompts, max_new_tokens=12, temperature=1.0, top_k=1, seed=5)
  assert [g.tokens for g in top1] == [g.tokens for g in greedy]
  limited = sampler.generate(params, prompts, max_new_tokens=5)
  assert [g.tokens for g in limited] == [g.tokens[:5] for g in greedy]
  assert all(g.finish_reason == "length" for g in limited)
  # A stop sequence (the first row's tokens 3..4): a row ends right after its first occurrence.
  row = greedy[0].tokens
  stop = row[3:5]
  end = next(i for i in range(1, len(row)) if row[i - 1:i + 1] == stop) + 1
  stopped = sampler.generate(params, prompts, max_new_tokens=12, stop_ids=[stop])
  assert stopped[0].tokens == row[:end] and stopped[0].finish_reason == "stop"
  assert stopped[1].tokens[:len(greedy[1].tokens)] == greedy[1].tokens[:len(stopped[1].tokens)]


def test_greedy_equals_transformers_generate(params, tmp_path):
  torch = pytest.importorskip("torch")
  import transformers  # pylint: disable=g-import-not-at-top
  hf_io.export_hf(params, CFG, tmp_path / "hf")
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  prompt = [[3, 14, 15, 92, 65, 35]]
  with torch.no_grad():
    ref = model.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt[0]):].tolist()
  ours = Sampler(CFG).generate(params, prompt, max_new_tokens=20)[0]
  assert ours.tokens == ref


MESH = r"""
import json, jax, numpy as np
from proxykd.models.config import preset
from proxykd.models.sampling import Sampler
from proxykd.models.transformer import init_params
from proxykd.train import sharding as shd
cfg = preset("tiny")
params = init_params(cfg, jax.random.PRNGKey(4))
prompts = [[5, 6, 7], [9, 10, 11, 12], [1, 2], [40, 41, 42, 43, 44]]
single = Sampler(cfg).generate(params, prompts, max_new_tokens=10, temperature=0.8, seed=3)
mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
shardings = shd.param_shardings(cfg, mesh)
sharded_params = jax.device_put(params, shardings)
sampler = Sampler(cfg, param_shardings=shardings, batch_sharding=shd.batch_sharding(mesh),
                  batch_multiple=shd.batch_divisor(mesh), context=lambda: shd.mesh_context(mesh))
meshed = sampler.generate(sharded_params, prompts, max_new_tokens=10, temperature=0.8, seed=3)
print("RESULT" + json.dumps({"single": [g.tokens for g in single], "mesh": [g.tokens for g in meshed],
                             "single_lp": [g.logprobs for g in single], "mesh_lp": [g.logprobs for g in meshed]}))
"""


def test_unrolled_layers_sample_what_the_layer_scan_samples(params):
  """The two decode layouts (per-layer weights and caches on CPU, the scan elsewhere) agree."""
  prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [3] * 20]
  kw = dict(max_new_tokens=10, top_logprobs=3)
  scan = Sampler(CFG, unroll_layers=False).generate(params, prompts, **kw)
  unrolled = Sampler(CFG, unroll_layers=True).generate(params, prompts, **kw)
  assert Sampler(CFG).unroll_layers == (jax.default_backend() == "cpu")
  for a, b in zip(scan, unrolled):
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert [[t for t, _ in top] for top in a.top_logprobs] == [[t for t, _ in top] for top in b.top_logprobs]
  sampled = [Sampler(CFG, unroll_layers=u).generate(params, prompts, max_new_tokens=10,
                                                    temperature=1.0, top_p=0.9, seed=3)
             for u in (False, True)]
  assert [g.tokens for g in sampled[0]] == [g.tokens for g in sampled[1]]


def test_sampling_on_a_mesh_equals_one_device():
  out = json.loads(run_python(MESH, devices=8).split("RESULT", 1)[1])
  assert out["mesh"] == out["single"]
  np.testing.assert_allclose(np.concatenate(out["mesh_lp"]), np.concatenate(out["single_lp"]),
                             atol=1e-4)
